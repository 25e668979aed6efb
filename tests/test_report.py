"""benchmarks/report.py: its statistics (IQM, probability of improvement, stratified bootstrap) and a
report from Mava's own marl-eval files next to one of ours."""

import json
import os
import re
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from benchmarks import report  # noqa: E402
from utils.logging import MarlEvalJson  # noqa: E402

MAVA = os.path.join(REPO, "tests", "data", "mava")  # byte-identical copies of ../shared/data/mava (Mava's own runs)
MAVA_FILES = sorted(os.path.join(MAVA, name) for name in os.listdir(MAVA)
                    if name.endswith(".json"))


def test_iqm_is_the_mean_of_the_middle_half():
    scores = np.array([5.0, 100.0, 0.0, 3.0, 6.0, 1.0, 4.0, 2.0])  # sorted 0..6, 100: middle four 2, 3, 4, 5
    assert report.iqm(scores) == pytest.approx(3.5)
    assert np.mean(scores) == pytest.approx(15.125)  # the outlier drags the mean, not the IQM
    # pooled over tasks (runs x tasks flattened), and row by row with a leading replicate axis
    assert report.aggregate_iqm([scores[:4], scores[4:]]) == pytest.approx(3.5)
    assert report.aggregate_mean([scores[:4], scores[4:]]) == pytest.approx(15.125)
    np.testing.assert_allclose(report.iqm(np.stack([scores, scores + 1])), [3.5, 4.5])


def test_probability_of_improvement():
    rng = np.random.default_rng(0)
    low, high = rng.uniform(0, 1, 5), rng.uniform(2, 3, 4)
    assert report.probability_of_improvement([high], [low]) == 1.0
    assert report.probability_of_improvement([low], [high]) == 0.0
    assert report.probability_of_improvement([low, high], [low, high]) == 0.5  # identical samples
    # brute force over every pair, ragged run counts, integer scores so ties (counting 1/2) occur
    x_tasks = [rng.integers(0, 4, n).astype(float) for n in (3, 5, 2)]
    y_tasks = [rng.integers(0, 4, n).astype(float) for n in (4, 1, 6)]
    per_task = []
    for x, y in zip(x_tasks, y_tasks):
        wins = 0.0
        for xi in x:
            for yj in y:
                wins += 1.0 if xi > yj else 0.5 if xi == yj else 0.0
        per_task.append(wins / (len(x) * len(y)))
    assert report.probability_of_improvement(x_tasks, y_tasks) == pytest.approx(np.mean(per_task))


def test_stratified_bootstrap_resamples_within_each_task():
    rng = np.random.default_rng(0)
    tasks = [np.ones(3), np.zeros(5)]
    replicates = report.stratified_resample(rng, tasks, reps=500)
    assert [r.shape for r in replicates] == [(500, 3), (500, 5)]  # each task keeps its run count
    means = np.stack([r.mean(axis=1) for r in replicates], axis=1)
    np.testing.assert_array_equal(means, np.tile([1.0, 0.0], (500, 1)))  # never a run from the other task
    point, lo, hi = report.interval_estimate(rng, report.aggregate_mean, [tasks], reps=500)
    assert (point, lo, hi) == (0.375, 0.375, 0.375)  # stratified: the pooled mean cannot move
    # with spread inside a task the CI is an honest interval round the point, reproducible from the seed
    noisy = [np.arange(8.0), np.arange(8.0) + 10]
    first = report.interval_estimate(np.random.default_rng(3), report.aggregate_iqm, [noisy], reps=400)
    again = report.interval_estimate(np.random.default_rng(3), report.aggregate_iqm, [noisy], reps=400)
    assert first == again and first[1] < first[0] < first[2]


def test_names_labels_and_budget_cut(tmp_path):
    assert report.canonical_env("LevelBasedForaging") == "lbf"
    assert report.canonical_env("RobotWarehouse") == "rware"
    assert report.canonical_env("MaConnector") == report.canonical_env("Connector") == "connector"
    assert report.canonical_env("HeuristicEnemySMAX") == report.canonical_env("Smax") == "smax"
    assert report.canonical_env("cleaner") == "cleaner" and report.canonical_env("newenv") == "newenv"
    assert report.source_label("/a/mava/x.json", []) == "mava"
    assert report.source_label("/a/ours/x.json", []) is None
    assert report.source_label("/a/ours/x.json", [("theirs", "/a/ours/*.json")]) == "theirs"
    assert report.parse_pair("mava:../shared/*.json") == ("mava", "../shared/*.json")
    # one algorithm name from two sources stays apart; a rename merges an old name into a new one
    for folder, algorithm in (("ours", "ff_mappo"), ("mava", "ff_mappo"), ("old", "mappo")):
        log = MarlEvalJson(str(tmp_path / folder / "r.json"), "lbf", "8x8", algorithm, seeds=[1])
        for k in range(3):
            log.add(k, 100 * (k + 1), {"mean_episode_return": np.array([0.1 * k])}, 0.0)
        log.add_absolute({"mean_episode_return": np.array([0.5])})
        log.write()
    paths = [str(tmp_path / folder / "r.json") for folder in ("ours", "mava", "old")]
    results, _ = report.read_results(paths, renames={"mappo": "ff_mappo_shared"}, max_steps=250)
    assert sorted(results[("lbf", "8x8")]) == ["ff_mappo", "ff_mappo_shared", "mava:ff_mappo"]
    run = results[("lbf", "8x8")]["ff_mappo"]["seed_1"]
    assert sorted(run) == ["step_0", "step_1"]  # cut at 250 steps, and the later absolute metric with it
    assert report.run_score(run, "mean_episode_return") == pytest.approx(0.1)


def test_report_from_mava_files_and_ours(tmp_path):
    ours = str(tmp_path / "ours.json")
    log = MarlEvalJson(ours, "lbf", "8x8-2p-2f-coop", "ff_mappo_shared", seeds=[0, 1, 2])
    for k in range(5):
        log.add(k, 98304 * (k + 1), {"mean_episode_return": np.array([0.2, 0.25, 0.3]) * (k + 1)}, 1.0)
    log.add_absolute({"mean_episode_return": np.array([0.9, 1.0, 1.0])})
    log.write()
    before = [open(path).read() for path in MAVA_FILES]
    out = tmp_path / "report"
    report.main([ours, *MAVA_FILES, "--out", str(out), "--reps", "200"])
    assert [open(path).read() for path in MAVA_FILES] == before
    for name in ("report.md", "iqm_mean_episode_return.png", "poi_mean_episode_return.png",
                 "curve_mean_episode_return_lbf_8x8-2p-2f-coop.png",
                 "curve_mean_episode_return_rware_tiny-2ag.png"):
        assert (out / name).stat().st_size > 0, name
    assert not [name for name in os.listdir(out) if name.startswith(".tmp")]
    text = (out / "report.md").read_text()
    sections = dict(re.findall(r"#### (\S+ / \S+)\n(.*?)(?=\n#+ )", text, flags=re.S))

    def seeds(task, algorithm):
        rows = [line.split("|") for line in sections[task].splitlines() if line.startswith(f"| `{algorithm}` |")]
        assert len(rows) == 1, (task, algorithm, sections[task])
        return int(rows[0][2])

    assert seeds("lbf / 8x8-2p-2f-coop", "ff_mappo_shared") == 3
    assert seeds("lbf / 8x8-2p-2f-coop", "mava:ff_mappo") == 2  # seeds 42 and 43, two files merged
    assert seeds("rware / tiny-2ag", "mava:ff_mappo") == 1
    assert "ff_mappo_shared" not in sections["rware / tiny-2ag"]
    assert "before* each update chunk" in text and "min-max normalised" in text
    # Mava's absolute metrics: 1.0 and 0.996875 on lbf, 0.05625 on rware
    data = [json.load(open(path)) for path in MAVA_FILES]
    lbf = [d["LevelBasedForaging"]["8x8-2p-2f-coop"]["ff_mappo"] for d in data if "LevelBasedForaging" in d]
    absolute = sorted(run["absolute_metrics"]["mean_episode_return"][0] for runs in lbf for run in runs.values())
    assert f"{np.mean(absolute):.3f} ± {np.std(absolute, ddof=1):.3f}" in sections["lbf / 8x8-2p-2f-coop"]
