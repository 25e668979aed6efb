"""CoPPO: all agents updated at once with the joint-ratio double clip (the stage engine, one stage).

Agent i maximises min(r_i g A, clip(r_i g, 1±ε) A) with g = clip(Π_{j≠i} r_j, 1±ε₁) detached
(``system.others_clip_eps`` = ε₁; A2PO repo's CoPPO: 0.1 for ε = 0.2).
Shared parameters by default, as in the comparisons users quote (the A2PO paper's SMAC table:
"CoPPO w/ PS") and ahead here (lbf 10x10-3p-3f: 0.953 vs 0.890 at 2M steps,
``benchmarks/results/learning.md``); ``network.parameter_sharing=separate`` gives one actor per agent.

    python systems/coppo_anakin.py env=rware env.task=tiny-4ag
"""

import hydra
from omegaconf import DictConfig

from systems.anakin import run_from_config
from systems.stages import StageConfig, make_stage_system, simultaneous


def build(settings, spec, vec_env, nets=None):
    return make_stage_system(settings, spec, vec_env, simultaneous(spec.num_agents), nets)

CONFIG = StageConfig


@hydra.main(config_path="../configs", config_name="coppo", version_base=None)
def main(cfg: DictConfig) -> float:
    return run_from_config(cfg, CONFIG, build)


if __name__ == "__main__":
    main()
