"""MAPPO: PPO with a centralised critic on the global state, all agents updated at once.

The stage engine's one-stage plan. With separate parameters the agents share one joint loss,
advantage normalisation and gradient-norm clip (Mava's convention, ``system.per_agent_losses=false``);
``system.per_agent_losses=true`` gives each agent its own.

    python systems/mappo_anakin.py                       # lbf 8x8-2p-2f-coop, 2M steps
    python systems/mappo_anakin.py env=rware env.task=tiny-2ag arch.total_timesteps=5e6
"""

import hydra
from omegaconf import DictConfig

from systems.anakin import run_from_config
from systems.ppo import PPOConfig
from systems.stages import make_stage_system, simultaneous

CONFIG = PPOConfig


def build(settings, spec, vec_env, nets=None):
    return make_stage_system(settings, spec, vec_env, simultaneous(spec.num_agents), nets)


@hydra.main(config_path="../configs", config_name="mappo", version_base=None)
def main(cfg: DictConfig) -> float:
    return run_from_config(cfg, CONFIG, build)


if __name__ == "__main__":
    main()
