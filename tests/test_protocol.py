"""benchmarks/protocol.py: a sweep runs each (system, task) once, continues where it was stopped (a
killed run from its checkpoint, to the same numbers), and refuses to mix budgets in one folder."""

import json
import os
import shutil
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from benchmarks import protocol  # noqa: E402

TASK = "lbf:8x8-2p-2f-coop"


def returns_of(entry: dict) -> dict:
    """Per seed: the evaluation returns by step and the absolute metric (times left out)."""
    return {seed: {key: (value["mean_episode_return"] if key != "absolute_metrics" else value)
                   for key, value in runs.items()} for seed, runs in entry.items()}


@pytest.mark.slow  # 2-core CI budget; continuing a stopped run is covered by test_sweep's resume and test_run_management
def test_a_sweep_runs_each_pair_once_and_continues_where_it_stopped(tmp_path, capsys):
    out = str(tmp_path / "sweep")
    argv = ["--preset", "smoke", "--systems", "mappo", "ippo", "--tasks", TASK, "--out", out, "--max-runs", "1",
            "--set", "arch.num_devices=1", "logger.plot=false", "arch.compilation_cache=off"]
    assert protocol.main(argv) == 0
    mappo, ippo = protocol.plan(["mappo", "ippo"], [TASK])
    assert protocol.job_status(out, mappo) == "done" and protocol.job_status(out, ippo) == "new"
    with open(os.path.join(out, "results.json")) as f:
        entry = json.load(f)["lbf"]["8x8-2p-2f-coop"]["ff_mappo_shared"]["seed_42"]
    assert "absolute_metrics" in entry and sorted(k for k in entry if k.startswith("step_")) == ["step_0", "step_1"]
    with open(os.path.join(out, "protocol.md")) as f:
        summary = f.read()
    assert "| mappo | lbf/8x8-2p-2f-coop | done |" in summary and "| ippo | lbf/8x8-2p-2f-coop | new |" in summary
    capsys.readouterr()
    assert protocol.main(argv[:4] + argv[5:]) == 0  # mappo alone: nothing left to do
    assert "1 runs, 1 done, 0 to resume, 0 new" in capsys.readouterr().out

    # killed after its first checkpoint: the next command resumes it from that folder
    os.remove(os.path.join(protocol.run_dir(out, mappo), "done.json"))
    shutil.rmtree(os.path.join(protocol.run_dir(out, mappo), "checkpoints", "2"))
    assert protocol.job_status(out, mappo) == "resume"
    preset = protocol.PRESETS["smoke"]
    resume = protocol.command(out, mappo, preset, [], "resume")
    assert f"logger.resume={protocol.run_dir(out, mappo)}" in resume and "logger.checkpoint.enabled=true" in resume
    assert not any(arg.startswith("logger.resume") for arg in protocol.command(out, ippo, preset, [], "new"))
    with pytest.raises(SystemExit, match="preset smoke"):
        protocol.main(["--preset", "cpu", "--systems", "mappo", "--tasks", TASK, "--out", out])


@pytest.mark.slow  # two training runs (~60 s); the fast test above checks the same steps without the resumed run
def test_a_killed_run_in_a_sweep_continues_bit_for_bit(tmp_path, capsys):
    out = str(tmp_path / "sweep")  # the cache makes the resumed run skip most of its compile
    argv = ["--preset", "smoke", "--systems", "mappo", "ippo", "--tasks", TASK, "--out", out, "--max-runs", "1",
            "--set", "arch.num_devices=1", "logger.plot=false", f"arch.compilation_cache={tmp_path / 'cache'}"]
    assert protocol.main(argv) == 0
    mappo, ippo = protocol.plan(["mappo", "ippo"], [TASK])
    assert protocol.job_status(out, mappo) == "done" and protocol.job_status(out, ippo) == "new"
    results = os.path.join(out, "results.json")
    with open(results) as f:
        finished = json.load(f)["lbf"]["8x8-2p-2f-coop"]["ff_mappo_shared"]
    assert "absolute_metrics" in finished["seed_42"] and "step_1" in finished["seed_42"]

    # as if killed during its second chunk: no marker, no second checkpoint, the JSON as it was then
    os.remove(os.path.join(protocol.run_dir(out, mappo), "done.json"))
    shutil.rmtree(os.path.join(protocol.run_dir(out, mappo), "checkpoints", "2"))
    with open(results) as f:
        data = json.load(f)
    for runs in data["lbf"]["8x8-2p-2f-coop"]["ff_mappo_shared"].values():
        runs.pop("absolute_metrics"), runs.pop("step_1")
    with open(results, "w") as f:
        json.dump(data, f)
    assert protocol.job_status(out, mappo) == "resume"

    capsys.readouterr()
    assert protocol.main(argv) == 0  # the killed run first; --max-runs 1 leaves ippo for later
    printed = capsys.readouterr().out
    assert "0 done, 1 to resume, 1 new" in printed, printed
    with open(os.path.join(out, "logs", "mappo_lbf_8x8-2p-2f-coop.log")) as f:
        assert "resuming from" in f.read()
    with open(results) as f:
        entries = json.load(f)["lbf"]["8x8-2p-2f-coop"]
    assert returns_of(entries["ff_mappo_shared"]) == returns_of(finished)  # bit-identical continuation
    assert "ff_ippo_shared" not in entries and protocol.job_status(out, ippo) == "new"
    with open(os.path.join(out, "protocol.md")) as f:
        summary = f.read()
    assert "| mappo | lbf/8x8-2p-2f-coop | done |" in summary and "| ippo | lbf/8x8-2p-2f-coop | new |" in summary
    assert "ff_mappo_shared" in summary

    assert protocol.main(argv[:4] + argv[5:]) == 0  # mappo alone: nothing left to do
    assert "1 runs, 1 done, 0 to resume, 0 new" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="preset smoke"):
        protocol.main(["--preset", "cpu", "--systems", "mappo", "--tasks", TASK, "--out", out])


@pytest.mark.parametrize("argv,needle", [
    (["--tasks", "lbf"], "write env:task"),
    (["--tasks", "lbf:9x9"], "unknown task '9x9'"),
    (["--systems", "nope"], "no systems/nope_anakin.py"),
    (["--set", "arch.total_timesteps=5"], "does not set"),
])
def test_bad_sweeps_are_refused_before_anything_runs(tmp_path, argv, needle):
    with pytest.raises(SystemExit, match=needle):
        protocol.main(["--preset", "smoke", "--out", str(tmp_path / "x"), *argv])
    assert not os.path.exists(tmp_path / "x" / "runs")
