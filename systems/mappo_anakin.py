"""MAPPO: PPO with a centralised critic on the global state, all agents updated at once.

    python systems/mappo_anakin.py                       # lbf 8x8-2p-2f-coop, 2M steps
    python systems/mappo_anakin.py env=rware env.task=tiny-2ag arch.total_timesteps=5e6
"""

import hydra
from omegaconf import DictConfig

from systems.anakin import run_from_config
from systems.ppo import PPOConfig, make_ppo_system

CONFIG = PPOConfig
build = make_ppo_system


@hydra.main(config_path="../configs", config_name="mappo", version_base=None)
def main(cfg: DictConfig) -> float:
    return run_from_config(cfg, CONFIG, build)


if __name__ == "__main__":
    main()
