"""Shared test utilities: small training settings built from the real Hydra configs."""

from __future__ import annotations

from conftest import compose_config


def small_settings(config: str, system_cls, overrides: list[str], results_dir: str):
    from systems.settings import load_settings

    base = [
        "arch.num_evaluation=2",
        "arch.num_eval_episodes=8",
        "arch.num_absolute_metric_eval_episodes=8",
        "arch.absolute_metric=false",
        "logger.progress=false",
        "logger.plot=false",
        f"logger.base_dir={results_dir}",
    ]
    return load_settings(compose_config(config, base + overrides), system_cls)
