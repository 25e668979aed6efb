"""Every CPU core by default, and the persistent compilation cache (a corrupt cache never breaks a run)."""

import glob
import json
import os
import subprocess
import sys

import pytest

from utils import devices
from utils.devices import HOST_DEVICE_FLAG, use_every_core

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def fresh_process(monkeypatch):
    """As if jax had not started yet and the user had set no XLA_FLAGS."""
    monkeypatch.setattr(devices, "_backends_started", lambda: False)
    monkeypatch.setattr(devices, "AUTO_HOST_DEVICES", None)
    monkeypatch.delenv("XLA_FLAGS", raising=False)


@pytest.mark.parametrize("cores,sizes,expected", [
    (2, (32, 32, 320), 2),
    (3, (32, 32, 320), 2),  # 3 does not divide 32 envs: the largest count that does
    (16, (32, 32, 320), 16),
    (5, (30, 40, 400), 5),
    (1, (32, 32, 320), 1),
])
def test_one_cpu_device_per_core_that_the_run_divides(fresh_process, cores, sizes, expected):
    assert use_every_core(False, sizes, cores=cores) == expected
    assert os.environ["XLA_FLAGS"] == f"{HOST_DEVICE_FLAG}={expected}"
    assert devices.AUTO_HOST_DEVICES == expected


def test_the_users_choice_is_left_alone(fresh_process, monkeypatch):
    assert use_every_core(True, (32,), cores=4) is None  # arch.num_devices was set
    assert "XLA_FLAGS" not in os.environ
    monkeypatch.setenv("XLA_FLAGS", f"--xla_cpu_enable_fast_math=false {HOST_DEVICE_FLAG}=3")
    assert use_every_core(False, (32,), cores=4) is None
    assert os.environ["XLA_FLAGS"] == f"--xla_cpu_enable_fast_math=false {HOST_DEVICE_FLAG}=3"
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_enable_fast_math=false")  # other flags: the count is added
    assert use_every_core(False, (32,), cores=4) == 4
    assert os.environ["XLA_FLAGS"] == f"--xla_cpu_enable_fast_math=false {HOST_DEVICE_FLAG}=4"


def test_too_late_once_jax_has_devices(monkeypatch):
    import jax

    jax.devices()
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    monkeypatch.setattr(devices, "AUTO_HOST_DEVICES", None)
    assert use_every_core(False, (32,), cores=4) is None
    assert "XLA_FLAGS" not in os.environ


def test_joining_a_multi_host_run_after_jax_started_is_a_clear_error():
    import jax

    jax.devices()
    with pytest.raises(ValueError, match="arch.distributed=true: jax had already created its devices"):
        devices.initialize_distributed("localhost:1", 2, 0)
    assert devices.same_on_every_process("results/run") == "results/run"  # one process: unchanged


def test_a_corrupt_cache_entry_is_compiled_again(tmp_path):
    import jax
    import jax.numpy as jnp
    from jax._src import compilation_cache

    saved = {key: getattr(jax.config, key) for key in (
        "jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
        "jax_persistent_cache_min_entry_size_bytes", "jax_raise_persistent_cache_errors")}
    try:
        assert devices.enable_compilation_cache(str(tmp_path / "cache")) == str(tmp_path / "cache")
        compilation_cache.reset_cache()
        program = lambda x: jnp.sin(x) * 2.0 + x.sum()  # noqa: E731
        expected = jax.jit(program)(jnp.arange(5.0))
        entries = [p for p in glob.glob(str(tmp_path / "cache" / "*")) if os.path.isfile(p)]
        assert entries, "nothing was cached"
        for path in entries:
            with open(path, "wb") as f:
                f.write(b"not an executable")
        jax.clear_caches()
        compilation_cache.reset_cache()
        with pytest.warns(UserWarning, match="persistent compilation cache"):
            again = jax.jit(program)(jnp.arange(5.0))
        assert (again == expected).all()
    finally:
        for key, value in saved.items():
            jax.config.update(key, value)
        compilation_cache.reset_cache()


def test_an_uncreatable_cache_folder_turns_the_cache_off(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.warns(UserWarning, match="arch.compilation_cache"):
        assert devices.enable_compilation_cache(str(blocker / "cache")) is None
    assert devices.enable_compilation_cache("off") is None and devices.enable_compilation_cache(False) is None


@pytest.mark.slow  # ~50 s on 2 cores; the device choice and the cache are checked above, the CLI by test_multihost
def test_a_default_cli_run_uses_every_core_and_fills_the_cache(tmp_path):
    cache = tmp_path / "cache"
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_COMPILATION_CACHE_DIR")}
    env["PYTHONPATH"] = REPO
    json_path = tmp_path / "results.json"
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "systems", "mappo_anakin.py"), "arch.total_timesteps=8192",
         "arch.num_evaluation=1", "arch.num_eval_episodes=8", "arch.absolute_metric=false", "system.rollout_length=16",
         "logger.progress=false", "logger.plot=false", "logger.checkpoint.enabled=false",
         f"logger.base_dir={tmp_path / 'runs'}", f"logger.json_path={json_path}", f"arch.compilation_cache={cache}"],
        env=env, capture_output=True, text=True, timeout=600, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    count = max(d for d in range(1, devices.host_cores() + 1) if 32 % d == 0 and 8 % d == 0 and 80 % d == 0)
    assert f"{count} device(s)" in proc.stdout
    if count > 1:
        assert "one per CPU core" in proc.stdout
    assert [p for p in glob.glob(str(cache / "*")) if os.path.isfile(p)], "the run cached nothing"
    assert "ff_mappo_shared" in json.loads(json_path.read_text())["lbf"]["8x8-2p-2f-coop"]
