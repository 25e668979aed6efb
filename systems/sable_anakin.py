"""Sable: a retention-based autoregressive joint policy with memory over the episode
(``networks.sable``), trained with PPO over (step, agent) tokens (``systems.joint_ppo``).

A centralised-execution (CTCE) baseline and MAGPO's default guider. Acting decodes the agents one
after another (a ``lax.scan`` over agents) with a decayed memory of the episode that is zeroed at
episode starts; training re-runs each env's whole rollout in Sable's parallel form from the memory
the rollout started with, so the envs per device are split into ``num_minibatches``. The encoder's
per-agent values are the critic. ``network.*`` is not used: the sizes are ``system.*`` keys
(``embed_dim``, ``n_block``, ``n_head``, ``decay_scaling_factor``, ``positional_encoding``).
``timestep_chunk_size`` (Mava's key) runs the parallel form over chunks of that many env steps and
carries the memory between them: the same maths as the whole rollout at once (to float rounding),
with less work on the decay and score matrices (``benchmarks/results/sable_chunks.md``).

    python systems/sable_anakin.py                       # lbf 8x8-2p-2f-coop, 2M steps
    python systems/sable_anakin.py env=coordsum env.task=3x10 system.n_block=2 system.ppo_epochs=15
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import hydra
from omegaconf import DictConfig

from networks.sable import make_sable
from systems.anakin import run_from_config
from systems.joint_ppo import make_joint_system
from systems.mat_anakin import MATConfig


@dataclasses.dataclass(frozen=True)
class SableConfig(MATConfig):
    """``system.*`` keys of Sable: MAT's plus the retention's decay and positional encoding (checked by
    ``joint_ppo.check_joint_sizes`` with MAT's)."""

    name: str = "sable"
    decay_scaling_factor: float = 0.8  # multiplies every head's decay κ_h (1: Sable's base decays)
    positional_encoding: bool = True  # add the sinusoidal encoding of the env step to q and k
    timestep_chunk_size: Optional[int] = 16  # env steps per parallel training chunk, memory carried (null: whole rollout)

    @property
    def network_kind(self) -> str:
        """Sable has a memory: its runs are ``rec_sable_*`` in the marl-eval JSON (as Mava's)."""
        return "rec"


CONFIG = SableConfig


def sable_nets(cfg, spec):
    """Sable of the sizes ``cfg`` (a system config with Sable's keys) names."""
    return make_sable(spec, cfg.embed_dim, cfg.n_block, cfg.n_head, cfg.decay_scaling_factor, cfg.add_agent_id,
                      cfg.positional_encoding, cfg.timestep_chunk_size)


def build(settings, spec, vec_env):
    return make_joint_system(settings, spec, vec_env, sable_nets(settings.system, spec))


@hydra.main(config_path="../configs", config_name="sable", version_base=None)
def main(cfg: DictConfig) -> float:
    return run_from_config(cfg, CONFIG, build)


if __name__ == "__main__":
    main()
