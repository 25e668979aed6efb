"""HAPPO: agents updated one at a time in a fresh uniform random order (HARL's agent-first loop).

Stage k trains agent i_k for all epochs on M·min(r A, clip(r, 1±ε) A), M = the unclipped product of
the already-updated agents' ratios; the centralised critic is trained once, after all actors.
Separate parameters by default (HAPPO's theory); shared parameters run the same order on a loss
masked to the stage's agent.

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
