"""MAT: the Multi-Agent Transformer, a centralised joint policy that decodes the agents' actions one
after another (``networks.mat``), trained with PPO over (step, agent) tokens (``systems.joint_ppo``).

A centralised-execution (CTCE) baseline: evaluation runs the joint policy itself, with every
agent's observation and the actions already chosen in the step. The encoder's per-agent values are
the critic (no global state). ``network.*`` is not used; the transformer's sizes are ``system.*``
keys (``embed_dim``, ``n_block``, ``n_head``). Defaults: Mava's ff_sable/MAT settings (lr 5e-4,
10 epochs, 1 minibatch, clip 0.2, entropy 0.01, max_grad_norm 10, embed 64, 1 block, 1 head).

    python systems/mat_anakin.py                         # lbf 8x8-2p-2f-coop, 2M steps
    python systems/mat_anakin.py env=rware env.task=tiny-2ag system.n_block=2
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import hydra
from omegaconf import DictConfig

from networks.mat import make_mat
from systems.anakin import run_from_config
from systems.joint_ppo import check_joint_sizes, make_joint_system
from systems.ppo import PPOConfig
from utils.config import require


@dataclasses.dataclass(frozen=True)
class MATConfig(PPOConfig):
    """``system.*`` keys of MAT: PPOConfig's (``critic_lr`` unused: one optimiser) and the transformer's."""

    name: str = "mat"
    centralised_critic: bool = False  # the encoder's values see every agent's observation
    ppo_epochs: int = 10
    num_minibatches: int = 1
    actor_lr: float = 5e-4
    max_grad_norm: float = 10.0
    embed_dim: int = 64
    n_block: int = 1
    n_head: int = 1
    add_agent_id: bool = True  # append the agent one-hot to each agent's observation (not for implicit ids)

    SWEEPABLE: ClassVar[tuple[str, ...]] = tuple(k for k in PPOConfig.SWEEPABLE if k != "critic_lr")

    def check(self, prefix: str) -> None:
        super().check(prefix)
        check_joint_sizes(self, prefix)
        require(self.recurrent_chunk_size is None, f"{prefix}.recurrent_chunk_size", self.recurrent_chunk_size,
                "must be null: joint policies train on whole rollouts (MAT has no memory; Sable re-runs each env's "
                "rollout from the memory it started with)")


CONFIG = MATConfig


def mat_nets(cfg, spec):
    """MAT of the sizes ``cfg`` (a system config with MAT's keys) names."""
    return make_mat(spec, cfg.embed_dim, cfg.n_block, cfg.n_head, cfg.add_agent_id)


def build(settings, spec, vec_env):
    return make_joint_system(settings, spec, vec_env, mat_nets(settings.system, spec))


@hydra.main(config_path="../configs", config_name="mat", version_base=None)
def main(cfg: DictConfig) -> float:
    return run_from_config(cfg, CONFIG, build)


if __name__ == "__main__":
    main()
