"""A multi-host run: two processes on localhost (one CPU device each, gloo collectives) joined by
``jax.distributed`` train the same parameters as one process with two devices, write one run folder,
one JSON and one set of checkpoints, and (``-m slow``) resume from them to the same parameters."""

import os
import shutil
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import FAST_COMPILE
from helpers import assert_identical_on_devices, small_settings
from systems.anakin import run
from systems.mappo_anakin import build as make_ppo_system
from systems.ppo import PPOConfig
from utils import checkpointing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OVERRIDES = ["arch.num_envs=8", "system.rollout_length=16", "arch.total_timesteps=1024", "arch.num_seeds=2",
             "arch.num_evaluation=2", "arch.num_eval_episodes=8", "arch.num_absolute_metric_eval_episodes=8",
             "arch.absolute_metric=false", "logger.progress=false", "logger.plot=false"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


def launch(run_dir: str, cache: str, extra: list[str] = ()) -> list[str]:
    """Two processes of systems/mappo_anakin.py joined as one run; returns their outputs."""
    port = free_port()
    # The in-process reference is compiled with the suite's flags (conftest): the processes use the same ones.
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count=1 {FAST_COMPILE}", "JAX_PLATFORMS": "cpu"}
    procs = [subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "systems", "mappo_anakin.py"), *OVERRIDES, *extra,
         f"hydra.run.dir={run_dir}", f"logger.base_dir={os.path.dirname(run_dir)}", f"arch.compilation_cache={cache}",
         "arch.distributed=true", f"arch.coordinator_address=localhost:{port}", "arch.num_processes=2",
         f"arch.process_id={index}"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for index in range(2)]
    outputs = []
    for proc in procs:
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, out[-3000:]
        outputs.append(out)
    return outputs


def final_params(run_dir: str, like):
    state, _, _ = checkpointing.restore(os.path.join(run_dir, "checkpoints"), 2, like)
    return state.params


def one_process_with_two_devices(tmp_path):
    """The reference run; its two devices hold identical parameters and half of the envs each."""
    assert jax.device_count() == 2, "conftest sets two CPU devices"
    one = run(small_settings("mappo", PPOConfig, OVERRIDES + ["arch.num_devices=2"], str(tmp_path / "one")),
              make_ppo_system, run_dir=str(tmp_path / "one" / "run"), log=lambda _: None)
    assert_identical_on_devices(one.learner_state.params, devices=2)
    assert one.learner_state.timestep.observation.agents_view.addressable_shards[0].data.shape[1] == 4
    return one


def assert_same_params(run_dir, one):
    for got, want in zip(jax.tree.leaves(final_params(run_dir, one.learner_state)),
                         jax.tree.leaves(one.learner_state.params)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_two_processes_train_like_one_process_with_two_devices(tmp_path):
    one = one_process_with_two_devices(tmp_path)
    run_dir = str(tmp_path / "multi" / "run")
    first, second = launch(run_dir, "off")
    assert "2 device(s)" in first and "trained 2,048 steps" in first, first[-2000:]
    assert "trained" not in second and "eval return" not in second, "only process 0 reports"
    assert {"checkpoints", "metrics.json"} <= set(os.listdir(run_dir))
    assert checkpointing.committed_steps(os.path.join(run_dir, "checkpoints")) == [1, 2]
    assert_same_params(run_dir, one)


@pytest.mark.slow  # 2 more launches (~45 s); resume itself is covered in one process by test_run_management
def test_two_processes_resume_a_killed_run_bit_for_bit(tmp_path):
    one = one_process_with_two_devices(tmp_path)
    run_dir, cache = str(tmp_path / "multi" / "run"), str(tmp_path / "cache")
    launch(run_dir, cache)
    # kill -9 after the first evaluation, as far as the files are concerned; both processes resume
    shutil.rmtree(os.path.join(run_dir, "checkpoints", "2"))
    first, _ = launch(run_dir, cache, ["logger.resume=true"])
    assert "resuming from" in first, first[-2000:]
    assert_same_params(run_dir, one)
