"""Tests run on CPU with two host devices so the multi-device path is always exercised."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def compose_config(name: str, overrides: list[str]):
    """The Hydra config ``configs/<name>.yaml`` with command-line style overrides."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        return compose(config_name=name, overrides=overrides)


@pytest.fixture
def tmp_results(tmp_path):
    return str(tmp_path / "results")
