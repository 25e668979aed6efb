"""A2PO: agent-by-agent updates in a semi-greedy order with PreOPC advantages and an adaptive clip.

- Order: even positions (0-based) take the remaining agent with the highest mean |A| (device-mean
  scores), odd positions a uniformly random remaining agent.
- Before each stage, PreOPC recomputes the advantage with trace λ·min(1, ρ_preceding) and the
  critic is refit to the corrected return during the stage.
- Surrogate min(r g A, clip(r g, 1±ε_k) A), g = clip(ρ_preceding, 1±ε/2), ε_k = ε(c + (1−c)k/n).
- Shared parameters (Algorithm 2, the default): the order is cut into ``block_num`` contiguous
  blocks, stage b trains on blocks 1..b (cumulative) for ceil(ppo_epochs / block_num) epochs, and
  every agent counts as preceding. This is the setting of the paper's SMAC results (Table 5, all
  methods "w/ PS"; its README recommends sharing for SMAC) and it measured ahead here: connector
  con-7x7x5a absolute 3.51 vs 2.82 with separate parameters (3 seeds, 2M steps; the table in
  ``benchmarks/results/learning.md``).
  Separate parameters (Algorithm 1, ``network.parameter_sharing=separate``, A2PO's MA-MuJoCo and
  GRF setting): one agent per stage.

    python systems/a2po_anakin.py env=rware env.task=tiny-4ag
    python systems/a2po_anakin.py system.block_num=3
    python systems/a2po_anakin.py network.parameter_sharing=separate   # Algorithm 1
"""

import dataclasses
import math

import hydra
from omegaconf import DictConfig

from systems.anakin import run_from_config
from systems.stages import (
    Plan,
    StageConfig,
    blocks_from_order,
    from_order,
    keyed,
    make_stage_system,
    random_order,
    semi_greedy_order,
)
from utils.config import one_of, require


@dataclasses.dataclass(frozen=True)
class A2POConfig(StageConfig):
    order: str = "semi_greedy"  # semi_greedy | random (HAPPO's order, an ablation)
    block_num: int = 2  # shared parameters: cumulative blocks of the order (clamped to the agent count)

    def check(self, prefix: str) -> None:
        super().check(prefix)
        one_of(f"{prefix}.order", self.order, ["semi_greedy", "random"])
        require(self.block_num >= 1, f"{prefix}.block_num", self.block_num, "must be >= 1")


def a2po_plan(cfg: A2POConfig, num_agents: int, shared: bool) -> Plan:
    def order(key, score):
        return semi_greedy_order(key, score) if cfg.order == "semi_greedy" else random_order(key, num_agents)

    if not shared:
        return Plan(keyed(lambda key, score: from_order(order(key, score))), num_stages=num_agents, capacity=1)
    blocks = min(cfg.block_num, num_agents)
    return Plan(keyed(lambda key, score: blocks_from_order(order(key, score), blocks)), num_stages=blocks,
                dense=True, cumulative=True, stage_epochs=math.ceil(cfg.ppo_epochs / blocks))


def build(settings, spec, vec_env, nets=None):
    shared = settings.network.parameter_sharing == "shared"
    return make_stage_system(settings, spec, vec_env, a2po_plan(settings.system, spec.num_agents, shared), nets)

CONFIG = A2POConfig


@hydra.main(config_path="../configs", config_name="a2po", version_base=None)
def main(cfg: DictConfig) -> float:
    return run_from_config(cfg, CONFIG, build)


if __name__ == "__main__":
    main()
