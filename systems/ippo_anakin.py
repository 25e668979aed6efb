"""IPPO: independent PPO learners (critic on each agent's own view), all agents updated at once.

    python systems/ippo_anakin.py env=rware env.task=tiny-4ag arch.num_seeds=3
"""

import hydra
from omegaconf import DictConfig

from systems.anakin import run_from_config
from systems.ppo import PPOConfig, make_ppo_system

CONFIG = PPOConfig
build = make_ppo_system


@hydra.main(config_path="../configs", config_name="ippo", version_base=None)
def main(cfg: DictConfig) -> float:
    return run_from_config(cfg, CONFIG, build)


if __name__ == "__main__":
    main()
