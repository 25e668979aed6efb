"""HAPPO: agents updated one at a time in a fresh uniform random order (HARL's agent-first loop).

Stage k trains agent i_k for all epochs on M·min(r A, clip(r, 1±ε) A), M = the unclipped product of
the already-updated agents' ratios; the centralised critic is trained once, after all actors.
Shared parameters by default: one actor, updated stage by stage on a loss masked to the stage's
agent. That is the setting of the comparisons users quote (the A2PO paper's SMAC table: every method
"w/ PS") and it measured ahead here (``benchmarks/results/learning.md``, parameter sharing: lbf
10x10-3p-3f 0.77 vs 0.68 at 0.98M steps and absolute 0.911 vs 0.896; connector con-7x7x5a 3.02 at
0.59M vs 2.66 at 2M). ``network.parameter_sharing=separate`` is HAPPO's theory and HARL's default
(``share_param: False``): one actor per agent, each trained in its own stage.

    python systems/happo_anakin.py env=rware env.task=tiny-4ag
"""

import hydra
from omegaconf import DictConfig

from systems.anakin import run_from_config
from systems.stages import Plan, StageConfig, from_order, keyed, make_stage_system, random_order


def happo_plan(num_agents: int) -> Plan:
    return Plan(keyed(lambda key, score: from_order(random_order(key, num_agents))), num_stages=num_agents, capacity=1)


def build(settings, spec, vec_env, nets=None):
    return make_stage_system(settings, spec, vec_env, happo_plan(spec.num_agents), nets)

CONFIG = StageConfig


@hydra.main(config_path="../configs", config_name="happo", version_base=None)
def main(cfg: DictConfig) -> float:
    return run_from_config(cfg, CONFIG, build)


if __name__ == "__main__":
    main()
