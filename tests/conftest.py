"""Tests run on CPU with two host devices so the multi-device path is always exercised.

Two things keep the suite fast, and neither changes what a test checks:

- ``FAST_COMPILE``: tests compile hundreds of programs and run each for a few steps, and about two
  thirds of the suite's time was XLA compiling. LLVM's optimisation level 0 compiles faster. Results
  then differ from an optimised build by float rounding (about 1e-7), and every comparison inside a
  test is between programs built with the same flags. The golden runs check bit-for-bit agreement
  with recorded parameters, so ``test_golden`` runs them in a subprocess with the default flags.
- A persistent compilation cache for the session, in a fresh temporary folder (one per pytest-xdist
  worker, removed at the end). A program that several tests build the same way compiles once.
"""

import os
import shutil
import tempfile

FAST_COMPILE = "--xla_backend_optimization_level=0"
os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count=2 {FAST_COMPILE}")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
_OWNED_CACHE: list[str] = []  # the session's cache folder, removed by the process that made it


def pytest_configure(config):
    """The session's compilation cache, unless the user chose one (``JAX_COMPILATION_CACHE_DIR``)."""
    root = os.environ.get("MARL_TESTS_JAX_CACHE")
    if root is None:
        if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
            return
        root = os.environ["MARL_TESTS_JAX_CACHE"] = tempfile.mkdtemp(prefix="marl-tests-jax-cache-")
        _OWNED_CACHE.append(root)  # xdist workers inherit the variable and use a folder each inside it
    folder = os.path.join(root, os.environ.get("PYTEST_XDIST_WORKER", "main"))
    os.environ["JAX_COMPILATION_CACHE_DIR"] = folder  # what the runs' arch.compilation_cache=auto uses
    from utils.devices import enable_compilation_cache

    enable_compilation_cache(folder)  # the runs' own cache set-up: every program cached


def pytest_unconfigure(config):
    for root in _OWNED_CACHE:
        shutil.rmtree(root, ignore_errors=True)


def compose_config(name: str, overrides: list[str]):
    """The Hydra config ``configs/<name>.yaml`` with command-line style overrides."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        return compose(config_name=name, overrides=overrides)


@pytest.fixture
def tmp_results(tmp_path):
    return str(tmp_path / "results")
