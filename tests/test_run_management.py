"""Run management through the shared driver: checkpoints and exact resume, corrupt or wrong
checkpoints, load-and-evaluate, marl-eval JSON, the non-finite guard, Neptune (mocked, no network).

One small MAPPO run (2 devices, 3 evaluations, a checkpoint after each) is trained once for the
module; the other runs reuse its compiled programs through a persistent compilation cache.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import types

import jax
import numpy as np
import pytest
from helpers import small_settings

from systems import anakin, evaluate as evaluate_cli, resume
from systems.anakin import NonFiniteError, run
from systems.mappo_anakin import build as make_ppo_system
from systems.ppo import PPOConfig
from systems.settings import config_dict
from utils import checkpointing
from utils.checkpointing import CheckpointError
from utils.logging import MarlEvalJson
from utils.neptune_logger import NeptuneMissingError, start_neptune

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = ["arch.num_envs=8", "system.rollout_length=16", "arch.total_timesteps=768", "arch.num_evaluation=3",
       "arch.num_devices=2", "arch.absolute_metric=true", "arch.num_absolute_metric_eval_episodes=16",
       "logger.checkpoint.max_to_keep=3"]
FAKE_TOKEN = base64.b64encode(json.dumps({"api_address": "http://127.0.0.1:9", "api_key": "s3cr3t-t0ken"}).encode()).decode()


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    """Identical programs compile once per module (runs build new jitted closures each time)."""
    from jax._src import compilation_cache as cache

    old = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax_cache")))
    cache.reset_cache()
    yield
    jax.config.update("jax_compilation_cache_dir", old)
    cache.reset_cache()


def settings_for(results_dir, extra=()):
    return small_settings("mappo", PPOConfig, RUN + list(extra), str(results_dir))


def train(results_dir, run_dir=None, extra=(), lines=None):
    log = lines.append if lines is not None else (lambda _: None)
    return run(settings_for(results_dir, extra), make_ppo_system, run_dir=run_dir, log=log)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    base = tmp_path_factory.mktemp("results")
    return train(base, run_dir=str(base / "run"))


def leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def without_timing(data):
    """A marl-eval JSON tree without wall-clock values."""
    if isinstance(data, dict):
        return {k: without_timing(v) for k, v in data.items() if k not in ("elapsed_time", "steps_per_second")}
    return data


# ----------------------------------------------------------------------------------------------
def test_run_writes_checkpoints_json_and_evaluates_before_training(trained):
    assert checkpointing.committed_steps(trained.checkpoint_dir) == [1, 2, 3]
    assert list(trained.eval_steps) == [0, 256, 512, 768]  # one evaluation before training
    assert trained.absolute_return is not None and trained.absolute_return.shape == (1,)
    with open(os.path.join(trained.run_dir, "metrics.json")) as f:
        data = json.load(f)
    seed = data["lbf"]["8x8-2p-2f-coop"]["ff_mappo_shared"]["seed_42"]
    assert sorted(seed) == ["absolute_metrics", "step_0", "step_1", "step_2"]  # Mava's count of entries
    assert [seed[f"step_{i}"]["step_count"] for i in range(3)] == [256, 512, 768]
    for key in ("mean_episode_return", "steps_per_second", "elapsed_time"):
        assert key in seed["step_2"]
    assert isinstance(seed["step_2"]["mean_episode_return"], list)
    assert seed["absolute_metrics"]["mean_episode_return"] == [pytest.approx(float(trained.absolute_return[0]))]
    meta = checkpointing.read_meta(trained.checkpoint_dir, 3)
    assert meta["config"]["arch"]["num_envs"] == 8 and meta["build_system"] == "systems.mappo_anakin:build"


def test_resume_after_a_kill_equals_the_uninterrupted_run(trained, tmp_path, monkeypatch):
    """Killed during chunk 3 (after checkpoint 2, while writing checkpoint 3): the resumed run ends
    with the same parameters, evaluations, absolute metric and JSON as the run that was not killed.
    Neptune is on (a stand-in module, a token that must not leak, no network)."""
    copy = tmp_path / "results" / "run"
    shutil.copytree(trained.run_dir, copy)
    shutil.rmtree(copy / "checkpoints" / "3")
    partial = copy / "checkpoints" / "3.orbax-checkpoint-tmp-1700000000"  # the write the kill interrupted
    shutil.copytree(os.path.join(trained.checkpoint_dir, "2"), partial)
    (partial / "state" / "manifest.ocdbt").write_bytes(b"\0garbage")
    fake = FakeNeptune()
    monkeypatch.setitem(sys.modules, "neptune", fake)
    monkeypatch.setenv("NEPTUNE_API_TOKEN", FAKE_TOKEN)
    monkeypatch.setenv("NEPTUNE_PROJECT", "team/project")

    lines = []
    resumed = train(tmp_path / "results", extra=["logger.resume=true", "logger.neptune.enabled=true",
                                                 "logger.neptune.connect_timeout=0.5"], lines=lines)
    assert resumed.resumed_from == 2 and resumed.run_dir == str(copy)
    for a, b in zip(leaves(resumed.learner_state), leaves(trained.learner_state)):
        np.testing.assert_array_equal(a, b)  # bit-exact: params, optimiser states, keys, env states
    np.testing.assert_array_equal(resumed.eval_returns, trained.eval_returns)
    np.testing.assert_array_equal(resumed.absolute_return, trained.absolute_return)
    assert len(resumed.train_metrics) == 1  # only chunk 3 ran again
    with open(copy / "metrics.json") as f, open(os.path.join(trained.run_dir, "metrics.json")) as g:
        assert without_timing(json.load(f)) == without_timing(json.load(g))
    assert checkpointing.committed_steps(copy / "checkpoints") == [1, 2, 3]
    assert not partial.exists()  # the half-written folder was cleaned up by the next save

    assert fake.runs and fake.runs[0].kwargs["mode"] == "offline"  # token present, server unreachable
    assert fake.runs[0].kwargs["project"] == "team/project"
    logged = fake.runs[0].series
    assert logged["eval/mean_episode_return"] == [(768, pytest.approx(float(np.mean(trained.eval_returns[-1]))))]
    assert fake.runs[0].stopped
    text = "\n".join(lines)
    assert "offline" in text
    for root, _, files in os.walk(copy):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                content = f.read()
            assert b"s3cr3t-t0ken" not in content and FAKE_TOKEN.encode() not in content
    assert "s3cr3t" not in text and FAKE_TOKEN not in text


def test_resume_true_finds_the_latest_matching_run_or_starts_fresh(trained, tmp_path):
    say = []
    settings = settings_for(tmp_path, ["logger.resume=true"])
    assert resume.find_resume_point(settings, None, say.append) is None and "starting a new run" in say[0]
    shutil.copytree(trained.run_dir, tmp_path / "old")
    other = settings_for(tmp_path, ["logger.resume=true", "system.clip_eps=0.3"])
    assert resume.find_resume_point(other, None, say.append) is None  # a different config is not resumed
    assert "different config" in say[-1] and "system.clip_eps" in say[-1] and "starting a new run" in say[-1]
    directory, step = resume.find_resume_point(settings, None, say.append)
    assert directory == str(tmp_path / "old" / "checkpoints") and step == 3
    explicit = settings_for(tmp_path, [f"logger.resume={tmp_path / 'old'}"])
    assert resume.find_resume_point(explicit, None, say.append) == (directory, 3)
    # A key added to the code after the checkpoint was written takes its default: still the same config.
    meta = json.loads(json.dumps(checkpointing.read_meta(directory, 3)))
    del meta["config"]["network"]["activation"]
    assert resume.saved_training_config(meta, PPOConfig) == resume.training_config(
        config_dict(settings), settings.num_devices)
    with pytest.raises(CheckpointError, match="config differs.*system.clip_eps.*explicit logger.resume"):
        resume.restore_run((directory, 3), None, None, settings_for(tmp_path, ["system.clip_eps=0.3"]))


def test_explicit_resume_accepts_changed_system_hyperparameters_only():
    saved = {"arch": {"num_envs": 8}, "system": {"name": "mappo", "actor_lr": 1.0}, "devices": 2}
    lower_lr = {**saved, "system": {"name": "mappo", "actor_lr": 0.1}}
    assert resume.check_resume_config(saved, saved, explicit=False, where="c") == []
    assert "system.actor_lr" in resume.check_resume_config(saved, lower_lr, explicit=True, where="c")[0]
    with pytest.raises(CheckpointError, match="system.actor_lr"):
        resume.check_resume_config(saved, lower_lr, explicit=False, where="c")  # resume=true: exact only
    for other in ({**saved, "arch": {"num_envs": 16}}, {**saved, "devices": 1},
                  {**saved, "system": {"name": "ippo", "actor_lr": 1.0}}):
        with pytest.raises(CheckpointError, match="config differs"):
            resume.check_resume_config(saved, other, explicit=True, where="c")


def test_wrong_or_corrupt_checkpoints_give_clear_errors(trained, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(trained.run_dir, copy)
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.txt").write_text("x")
    for path, needle in [(tmp_path / "missing", "does not exist"), (tmp_path / "empty", "no checkpoint found"),
                         (tmp_path / "file.txt", "is a file")]:
        assert evaluate_cli.main([f"checkpoint={path}"]) == 2
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err, err

    # Damaged array data in the latest checkpoint: a clear error naming it and the earlier ones.
    for item in ("state", "host"):
        for root, _, files in os.walk(copy / "checkpoints" / "3" / item):
            for name in files:
                with open(os.path.join(root, name), "wb") as f:
                    f.write(b"not an array")
    assert evaluate_cli.main([f"checkpoint={copy}", "params=final"]) == 2
    err = capsys.readouterr().err
    assert "checkpoints/3" in err and "corrupt" in err and "[1, 2]" in err and "Traceback" not in err
    with pytest.raises(CheckpointError, match="corrupt"):
        train(tmp_path, extra=[f"logger.resume={copy}"])
    # An incomplete checkpoint folder (an item missing) is named as such.
    shutil.rmtree(copy / "checkpoints" / "2" / "meta")
    with pytest.raises(CheckpointError, match="incomplete"):
        checkpointing.read_meta(str(copy / "checkpoints"), 2)
    # The previous checkpoint stays usable.
    assert evaluate_cli.main([f"checkpoint={copy / 'checkpoints' / '1'}"]) == 0


def test_evaluate_entry_point_loads_and_evaluates_and_renders(trained, tmp_path, capsys):
    out = tmp_path / "eval.json"
    code = evaluate_cli.main([f"checkpoint={trained.run_dir}", "params=best", "episodes=16",
                              f"output={out}", "render=true", "max_frames=3", f"render_dir={tmp_path / 'frames'}"])
    assert code == 0
    result = json.loads(out.read_text())
    assert result["episodes"] == 16 and result["params"] == "best"
    assert result["checkpoint"].endswith(os.path.join("checkpoints", "3"))
    assert np.isfinite(result["mean"]["mean_episode_return"])
    assert os.path.exists(result["render"]) and result["render"].endswith(".gif")
    assert "seed 42" in capsys.readouterr().out
    # The final parameters of checkpoint 3 evaluated on the training protocol's episode count give a
    # number in the range the run saw; evaluation keys differ from training's, so not equal.
    assert 0.0 <= result["mean"]["mean_episode_return"] <= 1.0


def test_evaluate_script_bad_path_exits_with_a_message(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(REPO, "systems", "evaluate.py"),
                           f"checkpoint={tmp_path / 'nope'}"], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=120)
    assert proc.returncode == 2
    assert "does not exist" in proc.stderr and "Traceback" not in proc.stderr


def test_non_finite_loss_stops_with_step_and_last_checkpoint(trained, tmp_path, monkeypatch):
    real = anakin.compile_update_chunk

    def poisoned(*args, **kwargs):
        chunk, seconds = real(*args, **kwargs)
        calls = []

        def call(state):
            state, metrics = chunk(state)
            calls.append(1)
            if len(calls) == 2:  # the last update of the second chunk diverges
                metrics = dict(metrics)
                metrics["actor_loss"] = metrics["actor_loss"].at[-1].set(np.nan)
            return state, metrics

        return call, seconds

    monkeypatch.setattr(anakin, "compile_update_chunk", poisoned)
    with pytest.raises(NonFiniteError) as err:
        train(tmp_path, run_dir=str(tmp_path / "run"))
    message = str(err.value)
    # 6 updates of 128 steps, 2 per chunk: the 4th update ends at env step 512.
    assert "actor_loss" in message and "update 4" in message and "env step 512" in message
    assert os.path.join("run", "checkpoints", "1") in message and "logger.resume=" in message
    assert "Evaluations so far are in" in message
    assert checkpointing.committed_steps(tmp_path / "run" / "checkpoints") == [1]  # nothing bad saved


def test_non_finite_parameters_are_caught():
    metrics = {"actor_loss": np.zeros((2, 3))}
    assert anakin.non_finite(metrics, {"w": np.ones((3, 4))}) is None
    params = {"w": np.ones((3, 4)), "b": np.array([[0.0], [np.inf], [0.0]])}
    assert anakin.non_finite(metrics, params) == (1, [1], ["parameters"])


# ----------------------------------------------------------------------------------------------
def test_marl_eval_json_layout_and_append(tmp_path):
    path = str(tmp_path / "all.json")
    first = MarlEvalJson(path, "lbf", "8x8-2p-2f-coop", "mappo", [0, 1])
    first.add(0, 100, {"mean_episode_return": np.array([0.5, 0.25])}, 1.5)
    first.add_absolute({"mean_episode_return": np.array([0.75, 0.5])})
    first.write()
    other = MarlEvalJson(path, "lbf", "8x8-2p-2f-coop", "ippo", [0])  # another algorithm, same file
    other.add(0, 100, {"mean_episode_return": np.array([0.1]), "win_rate": np.array([50.0])}, 2.0)
    other.write()
    rerun = MarlEvalJson(path, "lbf", "8x8-2p-2f-coop", "mappo", [1])  # a rerun of seed 1 replaces it
    rerun.add(0, 100, {"mean_episode_return": np.array([0.9])}, 1.0)
    rerun.write()
    data = json.loads(open(path).read())
    runs = data["lbf"]["8x8-2p-2f-coop"]
    assert set(runs) == {"mappo", "ippo"}
    assert runs["mappo"]["seed_0"] == {
        "step_0": {"step_count": 100, "elapsed_time": 1.5, "mean_episode_return": [0.5]},
        "absolute_metrics": {"mean_episode_return": [0.75]},
    }
    assert runs["mappo"]["seed_1"] == {"step_0": {"step_count": 100, "elapsed_time": 1.0, "mean_episode_return": [0.9]}}
    assert runs["ippo"]["seed_0"]["step_0"]["win_rate"] == [50.0]


def test_plot_shows_win_rate_panel(tmp_path):
    from utils.logging import plot_learning_curve

    path = tmp_path / "curve.png"
    steps = np.array([0, 10, 20])
    plot_learning_curve(str(path), steps, np.random.rand(3, 2), "t", win_rates=100 * np.random.rand(3, 2),
                        absolute=np.array([0.5, 0.6]))
    from PIL import Image

    width, height = Image.open(path).size
    assert width > 1.5 * height  # two panels side by side


def test_console_is_quiet_without_a_terminal():
    from utils.logging import Console

    lines = []
    console = Console(total_steps=1000, num_evaluation=100, progress=True, sink=lines.append)
    console.start(0)
    for i in range(1, 101):
        console.evaluation(i, i * 10, f"step {i * 10}", "short")
    assert 18 <= len(lines) <= 22 and "ETA" in lines[-1] and "100/100" in lines[-1]


# ----------------------------------------------------------------------------------------------
class FakeRun:
    def __init__(self, **kwargs):
        self.kwargs, self.series, self.fields, self.stopped = kwargs, {}, {}, False

    def __getitem__(self, name):
        run = self

        class Field:
            def append(self, value, step=None):
                run.series.setdefault(name, []).append((step, value))

            def upload(self, path):
                run.fields[name] = f"file:{path}"

        return Field()

    def __setitem__(self, name, value):
        self.fields[name] = value

    def stop(self):
        self.stopped = True


class FakeNeptune(types.ModuleType):
    def __init__(self, fail_modes=()):
        super().__init__("neptune")
        self.runs, self.fail_modes = [], set(fail_modes)

    def init_run(self, **kwargs):
        if kwargs["mode"] in self.fail_modes:
            raise ConnectionError(f"cannot reach server with {os.environ.get('NEPTUNE_API_TOKEN')}")
        self.runs.append(FakeRun(**kwargs))
        return self.runs[-1]


def neptune_cfg(**changes):
    from systems.settings import NeptuneConfig

    return NeptuneConfig(**{"enabled": True, "connect_timeout": 0.5, **changes})


def test_neptune_missing_package_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "neptune", None)  # import neptune -> ImportError
    with pytest.raises(NeptuneMissingError, match=r"pip install -e '\.\[neptune\]'"):
        start_neptune(neptune_cfg(), "run", {}, warn=print)
    disabled = start_neptune(neptune_cfg(enabled=False), "run", {}, warn=print)  # off: never imported
    assert not disabled.enabled


def test_neptune_offline_without_token_and_never_fails(monkeypatch):
    fake = FakeNeptune()
    monkeypatch.setitem(sys.modules, "neptune", fake)
    monkeypatch.delenv("NEPTUNE_API_TOKEN", raising=False)
    warnings, said = [], []
    logger = start_neptune(neptune_cfg(project="team/p", tags=("a",)), "run", {"arch": {"seed": 1, "x": None}},
                           warn=warnings.append, say=said.append)
    assert logger.mode == "offline" and fake.runs[0].kwargs["mode"] == "offline" and fake.runs[0].kwargs["tags"] == ["a"]
    assert fake.runs[0].fields["config/arch/seed"] == 1 and "no NEPTUNE_API_TOKEN" in said[0]
    logger.log_metrics("eval", {"r": 1.0}, step=5)
    assert fake.runs[0].series["eval/r"] == [(5, 1.0)]

    def broken(*args, **kwargs):
        raise OSError("disk full")

    fake.runs[0].__class__ = type("Broken", (FakeRun,), {"__getitem__": broken})
    logger.log_metrics("eval", {"r": 2.0}, step=6)  # fails: a warning, then Neptune is off
    logger.log_metrics("eval", {"r": 3.0}, step=7)
    assert len(warnings) == 1 and "off for the rest" in warnings[0] and not logger.enabled


def test_neptune_unreachable_server_falls_back_and_hides_the_token(monkeypatch):
    fake = FakeNeptune(fail_modes={"async"})
    monkeypatch.setitem(sys.modules, "neptune", fake)
    monkeypatch.setenv("NEPTUNE_API_TOKEN", FAKE_TOKEN)
    monkeypatch.setattr("utils.neptune_logger._server_reachable", lambda token, timeout: True)
    warnings = []
    logger = start_neptune(neptune_cfg(project="team/p"), "run", {}, warn=warnings.append, say=lambda _: None)
    assert logger.mode == "offline" and [r.kwargs["mode"] for r in fake.runs] == ["offline"]
    assert warnings and FAKE_TOKEN not in warnings[0] and "<NEPTUNE_API_TOKEN>" in warnings[0]
    fake.fail_modes = {"async", "offline"}
    warnings.clear()
    logger = start_neptune(neptune_cfg(project="team/p"), "run", {}, warn=warnings.append, say=lambda _: None)
    assert not logger.enabled and "off for this run" in warnings[-1]


# ----------------------------------------------------------------------------------------------
def test_run_management_config_keys_are_validated(tmp_path):
    from utils.config import ConfigError

    defaults = settings_for(tmp_path, ["arch.num_absolute_metric_eval_episodes=null"])
    assert defaults.arch.num_absolute_metric_eval_episodes == 10 * defaults.arch.num_eval_episodes
    assert settings_for(tmp_path, ["logger.resume=/some/run"]).logger.resume == "/some/run"
    for overrides, needles in [
        (["logger.checkpoint.interval=0"], ["logger.checkpoint.interval", "0", "> 0"]),
        (["logger.neptune.mode=online"], ["logger.neptune.mode", "online", "offline"]),
        (["+logger.checkpoint.every=2"], ["logger.checkpoint.every", "valid keys", "interval"]),
        (["logger.resume=true", "logger.checkpoint.enabled=false"], ["logger.resume", "checkpoint.enabled"]),
        (["logger.resume=3"], ["logger.resume", "3", "bool", "str"]),
    ]:
        with pytest.raises(ConfigError) as err:
            settings_for(tmp_path, overrides)
        for needle in needles:
            assert needle in str(err.value), (needle, str(err.value))
