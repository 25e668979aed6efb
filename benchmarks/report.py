"""Comparison reports from marl-eval JSON files: our runs and Mava's side by side.

    python benchmarks/report.py results/a.json ../shared/data/mava/*.json --out reports/lbf
    python benchmarks/report.py results/*.json --out reports/smax --metric win_rate mean_episode_return
    python benchmarks/report.py ours.json other/*.json --out reports/x --label theirs='other/*.json' \\
        --rename mappo=ff_mappo_shared --reps 10000 --seed 0 --max-steps 2000000

Reads any number of marl-eval JSON files (``env -> task -> algorithm -> seed_k -> {step_k:
{step_count, elapsed_time, <metric>: [value]}, absolute_metrics: {<metric>: [value]}}``) and writes
into ``--out``, for each ``--metric`` (default ``mean_episode_return``):

- ``report.md``: the inputs, a per-task table (algorithm, seeds, last step, final evaluation
  mean ± std, absolute metric mean ± std, IQM of the score with its CI), the aggregate table (IQM
  and mean over runs x tasks with stratified-bootstrap 95% CIs) and the probability of improvement
  between every pair of algorithms (with CIs), and how scores were normalised;
- ``curve_<metric>_<env>_<task>.png``: per task, the mean over seeds of the metric against
  ``step_count``, with a 95% bootstrap band (seeds resampled with replacement);
- ``iqm_<metric>.png`` (IQM and mean interval plot) and ``poi_<metric>.png`` (probability of
  improvement intervals).

Every file is written atomically (temp file in the same folder, then ``os.replace``), through
``utils.logging.atomic_write_text`` and ``utils.logging.save_figure``.

Names. Mava names environments by their class (``LevelBasedForaging``, ``RobotWarehouse``,
``MaConnector``, ``Cleaner``, ``Smax``/``HeuristicEnemySMAX``, ``MPE``); ``ENV_NAMES`` maps those to
ours (``lbf``, ``rware``, ``connector``, ``cleaner``, ``smax``, ``mpe``; case-insensitive, other
names kept), so both sources' runs sit under one task. Algorithms from a file matched by
``--label NAME=GLOB`` (``NAME:GLOB`` works too) are shown as ``NAME:<algorithm>``; by default a
file under a folder named ``mava`` is labelled ``mava``, others not. So Mava's ``ff_mappo`` becomes
``mava:ff_mappo`` and never merges with a ``ff_mappo`` of ours. ``--rename OLD=NEW`` renames a
shown name afterwards (e.g. ``mappo=ff_mappo_shared`` for our older files, which used plain
``mappo``). Runs of one shown name from several files are merged (Mava writes one file per seed); a
seed key seen twice keeps both runs, the second as ``seed_k@<file name>``. ``--max-steps N``
compares at one budget: evaluations after ``step_count`` N are dropped, and a run that had any
loses its absolute metric (measured after all of its training), so its score is its last
evaluation kept. Without it, the per-task and aggregate sections warn where budgets differ.

Statistics (Agarwal et al. 2021, "Deep Reinforcement Learning at the Edge of the Statistical
Precipice", NeurIPS; the estimators of their ``rliable`` library, written here in numpy/scipy):

- a run's score: its absolute metric when the file has one (the marl-eval convention: the best
  evaluated parameters re-evaluated on more episodes, ours and Mava's alike), else its last evaluation;
- normalisation (aggregate only): ``minmax`` maps a task's scores to ``(s - lo) / (hi - lo)`` with
  lo/hi the smallest/largest value of the metric recorded for that task anywhere in the inputs (every
  algorithm, seed, evaluation and absolute metric, so lo is about the untrained policy's score);
  ``raw`` leaves them; ``auto`` (default) is raw for one task, minmax for more;
- IQM = ``scipy.stats.trim_mean(x, 0.25)`` of the pooled runs x tasks scores: the mean of the
  middle 50% (``floor(n/4)`` dropped at each end; rliable's ``aggregate_iqm``); the mean beside it
  is the plain mean of the same pool. With unequal seed counts, tasks with more seeds weigh more;
- stratified bootstrap: each replicate resamples, within every task separately, that task's runs
  with replacement (the run count per task is kept); 95% CI = 2.5th and 97.5th percentiles of the
  replicates (rliable's ``StratifiedBootstrap``, ``percentile`` method);
- probability of improvement P(X > Y) = mean over the tasks both have of
  ``U / (n m)``, U the Mann-Whitney statistic ``sum_ij [x_i > y_j] + 1/2 [x_i = y_j]`` (rliable's
  ``probability_of_improvement``); its CI resamples X's and Y's runs independently, each stratified
  by task (rliable's ``StratifiedIndependentBootstrap``).

Why not rliable itself: 1.2.0 resolves beside our pins (``pip install --dry-run rliable`` changes
none; it adds arch 7.2.0, statsmodels 0.15.0, patsy, formulaic, interface_meta, narwhals), but its
bootstrap module does not import with them: arch 7.2.0 calls pandas' ``deprecate_kwarg`` with the
signature from before pandas 3 (``TypeError`` under our pandas 3.1.1). ``rliable.metrics`` (no arch)
gives the same IQM and probability of improvement as the functions here, to the last digits.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shlex
import sys
from fnmatch import fnmatch
from functools import reduce
from typing import Any, Callable, Iterable, Optional, Sequence

import numpy as np
import scipy.stats

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from utils.logging import atomic_write_text, save_figure  # noqa: E402

# Mava's env_name (its Jumanji / JaxMARL class, lower-cased) -> ours. Names not here are kept.
ENV_NAMES = {
    "levelbasedforaging": "lbf",
    "robotwarehouse": "rware",
    "maconnector": "connector",
    "connector": "connector",
    "cleaner": "cleaner",
    "smax": "smax",
    "heuristicenemysmax": "smax",
    "mpe": "mpe",
}

MAVA_NOTE = (
    "Mava evaluates the parameters from *before* each update chunk (Mava issue #1204): its point at "
    "`step_count` = (k+1) x chunk shows the parameters after k chunks, one chunk behind ours at the same "
    "x (ours evaluate after k+1 chunks); its curves are drawn as recorded, not shifted. In both, the "
    "absolute metric re-evaluates the best evaluated parameters on 10x the episodes. `elapsed_time` is not "
    "used (Mava's first entry is 0.0)."
)

Runs = dict  # run name (seed_k) -> that run's marl-eval dict (step_k entries, absolute_metrics)
Results = dict  # (env, task) -> shown algorithm name -> Runs


# ---------------------------------------------------------------- statistics (pure numpy / scipy)


def iqm(scores: Any) -> np.ndarray:
    """Interquartile mean over the last axis: the mean of the middle 50% (trim_mean, 0.25 each end)."""
    return scipy.stats.trim_mean(np.asarray(scores, dtype=float), 0.25, axis=-1)


def pooled(task_scores: Sequence[Any]) -> np.ndarray:
    """Per-task run scores (..., n_m) pooled along the last axis: (..., sum n_m)."""
    return np.concatenate([np.asarray(s, dtype=float) for s in task_scores], axis=-1)


def aggregate_iqm(task_scores: Sequence[Any]) -> np.ndarray:
    return iqm(pooled(task_scores))


def aggregate_mean(task_scores: Sequence[Any]) -> np.ndarray:
    return np.mean(pooled(task_scores), axis=-1)


def probability_of_improvement(x_tasks: Sequence[Any], y_tasks: Sequence[Any]) -> np.ndarray:
    """P(X > Y) averaged over tasks; per task the Mann-Whitney U / (n m), ties counting 1/2.

    ``x_tasks[m]``: X's scores on task m, shape (..., n_m); ``y_tasks[m]``: (..., k_m)."""
    per_task = []
    for x, y in zip(x_tasks, y_tasks, strict=True):
        x = np.asarray(x, dtype=float)[..., :, None]
        y = np.asarray(y, dtype=float)[..., None, :]
        per_task.append(np.mean((x > y) + 0.5 * (x == y), axis=(-2, -1)))
    return np.mean(per_task, axis=0)


def stratified_resample(rng: np.random.Generator, task_scores: Sequence[Any], reps: int) -> list[np.ndarray]:
    """``reps`` bootstrap replicates: each task's runs drawn with replacement within that task,
    keeping its run count. Returns one (reps, n_m) array per task."""
    out = []
    for scores in task_scores:
        scores = np.asarray(scores, dtype=float)
        n = scores.shape[-1]
        out.append(scores[rng.integers(0, n, size=(reps, n))])
    return out


def percentile_interval(samples: np.ndarray, size: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """The percentile CI over the first (replicate) axis."""
    lo, hi = np.percentile(samples, [50.0 * (1 - size), 50.0 * (1 + size)], axis=0)
    return lo, hi


def interval_estimate(rng: np.random.Generator, statistic: Callable[..., np.ndarray],
                      groups: Sequence[Sequence[Any]], reps: int, size: float = 0.95) -> tuple[float, float, float]:
    """(point, lo, hi): ``statistic(*groups)`` and its stratified-bootstrap percentile CI. Each group
    (one algorithm's per-task scores) is resampled independently, stratified by task."""
    point = float(statistic(*groups))
    samples = statistic(*(stratified_resample(rng, group, reps) for group in groups))
    lo, hi = percentile_interval(np.asarray(samples), size)
    return point, float(lo), float(hi)


def curve_band(rng: np.random.Generator, values: np.ndarray, reps: int,
               size: float = 0.95) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """values (S seeds, E evaluations) -> mean over seeds (E,) and its bootstrap CI (E,), (E,): whole
    runs resampled (one task, so the stratified bootstrap is the plain bootstrap over seeds)."""
    values = np.asarray(values, dtype=float)
    means = values[rng.integers(0, values.shape[0], size=(reps, values.shape[0]))].mean(axis=1)
    lo, hi = percentile_interval(means, size)
    return values.mean(axis=0), lo, hi


def normalise(scores: Any, lo: float, hi: float) -> np.ndarray:
    """Min-max normalisation to [lo, hi] -> [0, 1] (a shift only when hi == lo)."""
    scores = np.asarray(scores, dtype=float)
    return (scores - lo) / (hi - lo) if hi > lo else scores - lo


# ---------------------------------------------------------------- reading


def canonical_env(name: str) -> str:
    return ENV_NAMES.get(name.lower(), name)


def parse_pair(text: str) -> tuple[str, str]:
    """``NAME=VALUE`` (or ``NAME:VALUE`` when there is no ``=``)."""
    sep = "=" if "=" in text else ":"
    name, _, value = text.partition(sep)
    if not name or not value:
        raise ValueError(f"expected NAME=VALUE, got {text!r}")
    return name, value


def source_label(path: str, labels: Sequence[tuple[str, str]]) -> Optional[str]:
    """The first ``(name, glob)`` whose glob matches the path; else ``mava`` for a file under a folder
    named ``mava``; else None."""
    absolute = os.path.abspath(path)
    for name, pattern in labels:
        if fnmatch(path, pattern) or fnmatch(absolute, os.path.abspath(pattern)):
            return name
    folders = os.path.normpath(absolute).split(os.sep)[:-1]
    return "mava" if "mava" in (folder.lower() for folder in folders) else None


def shown_name(algorithm: str, label: Optional[str], renames: dict[str, str]) -> str:
    name = f"{label}:{algorithm}" if label else algorithm
    return renames.get(name, name)


def expand_paths(patterns: Iterable[str]) -> list[str]:
    """Paths as given; a pattern that is not a file is globbed (for quoted globs). Duplicates dropped."""
    paths, seen = [], set()
    for pattern in patterns:
        matches = [pattern] if os.path.exists(pattern) else sorted(glob.glob(pattern))
        if not matches:
            raise SystemExit(f"no file matches {pattern!r}")
        for path in matches:
            if os.path.realpath(path) not in seen:
                seen.add(os.path.realpath(path))
                paths.append(path)
    return paths


def truncate_run(run: dict, max_steps: Optional[float]) -> dict:
    """The run as if training had stopped at ``max_steps``: later evaluations dropped, and with them the
    absolute metric (measured after all of training), so its score becomes the last evaluation kept."""
    if max_steps is None:
        return run
    kept = {k: v for k, v in run.items() if not (re.fullmatch(r"step_\d+", k) and v["step_count"] > max_steps)}
    if len(kept) < len(run):
        kept.pop("absolute_metrics", None)
    return kept


def merge_file(results: Results, data: dict, path: str, label: Optional[str],
               renames: dict[str, str], max_steps: Optional[float] = None) -> list[dict]:
    """Adds one file's runs to ``results``; returns one row per (env, task, algorithm) it held."""
    rows = []
    for env, tasks in data.items():
        for task, algorithms in tasks.items():
            for algorithm, runs in algorithms.items():
                name = shown_name(algorithm, label, renames)
                target = results.setdefault((canonical_env(env), task), {}).setdefault(name, {})
                for run, entries in runs.items():
                    key = run if run not in target else f"{run}@{os.path.basename(path)}"
                    target[key] = truncate_run(entries, max_steps)
                rows.append({"path": path, "env": env, "task": task, "algorithm": algorithm,
                             "name": name, "label": label, "seeds": sorted(runs)})
    return rows


def read_results(paths: Sequence[str], labels: Sequence[tuple[str, str]] = (),
                 renames: Optional[dict[str, str]] = None,
                 max_steps: Optional[float] = None) -> tuple[Results, list[dict]]:
    results: Results = {}
    rows: list[dict] = []
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        rows += merge_file(results, data, path, source_label(path, labels), renames or {}, max_steps)
    return results, rows


def scalar(value: Any) -> float:
    """A marl-eval metric value (a list, usually of one element) as one number: its mean."""
    return float(np.mean(value))


def evaluations(run: dict, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """(step_count (E,), metric (E,)) of a run's ``step_k`` entries holding the metric, in k order."""
    keys = sorted((k for k in run if re.fullmatch(r"step_\d+", k) and metric in run[k]), key=lambda k: int(k[5:]))
    return (np.array([run[k]["step_count"] for k in keys], dtype=float),
            np.array([scalar(run[k][metric]) for k in keys], dtype=float))


def absolute_metric(run: dict, metric: str) -> Optional[float]:
    absolute = run.get("absolute_metrics", {})
    return scalar(absolute[metric]) if metric in absolute else None


def run_score(run: dict, metric: str) -> Optional[float]:
    """The absolute metric when present, else the last evaluation (None when neither)."""
    absolute = absolute_metric(run, metric)
    if absolute is not None:
        return absolute
    values = evaluations(run, metric)[1]
    return float(values[-1]) if values.size else None


def aligned_curves(runs: Runs, metric: str) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """steps (E,) and values (S, E) at the step counts every run with the metric has."""
    curves = [evaluations(run, metric) for run in runs.values()]
    curves = [curve for curve in curves if curve[0].size]
    if not curves:
        return None
    common = reduce(np.intersect1d, [steps for steps, _ in curves])
    if not common.size:
        return None
    values = [dict(zip(steps.tolist(), vals.tolist())) for steps, vals in curves]
    return common, np.array([[v[s] for s in common.tolist()] for v in values])


def task_range(algorithms: dict[str, Runs], metric: str) -> tuple[float, float]:
    """(lo, hi) of every value of the metric recorded for a task: evaluations and absolute metrics."""
    values = []
    for runs in algorithms.values():
        for run in runs.values():
            values += evaluations(run, metric)[1].tolist()
            absolute = absolute_metric(run, metric)
            values += [] if absolute is None else [absolute]
    return float(min(values)), float(max(values))


def task_scores(algorithms: dict[str, Runs], metric: str) -> dict[str, np.ndarray]:
    """algorithm -> its runs' scores on this task (algorithms without the metric left out)."""
    out = {}
    for name, runs in sorted(algorithms.items()):
        scores = [score for score in (run_score(run, metric) for run in runs.values()) if score is not None]
        if scores:
            out[name] = np.array(scores)
    return out


# ---------------------------------------------------------------- tables


def mean_std(values: Sequence[float]) -> str:
    """``mean ± std`` (sample std, ddof=1); ``mean`` alone for one value; ``—`` for none."""
    values = np.asarray(values, dtype=float)
    if values.size == 0:
        return "—"
    if values.size == 1:
        return f"{values[0]:.3f}"
    return f"{values.mean():.3f} ± {values.std(ddof=1):.3f}"


def ci_text(point: float, lo: float, hi: float) -> str:
    return f"{point:.3f} [{lo:.3f}, {hi:.3f}]"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def per_task_rows(rng: np.random.Generator, algorithms: dict[str, Runs], metric: str, reps: int) -> list[list[str]]:
    rows = []
    for name, runs in sorted(algorithms.items()):
        finals, absolutes, scores, last_step = [], [], [], 0.0
        for run in runs.values():
            steps, values = evaluations(run, metric)
            if values.size:
                finals.append(values[-1])
                last_step = max(last_step, steps[-1])
            absolute = absolute_metric(run, metric)
            absolutes += [] if absolute is None else [absolute]
            score = run_score(run, metric)
            scores += [] if score is None else [score]
        if not scores:
            continue
        estimate = ci_text(*interval_estimate(rng, aggregate_iqm, [[scores]], reps))
        fallback = "" if len(absolutes) == len(scores) else " (last evaluation where no absolute metric)"
        rows.append([f"`{name}`", len(scores), f"{last_step:,.0f}", mean_std(finals), mean_std(absolutes),
                     estimate + fallback])
    return rows


def aggregate_rows(rng: np.random.Generator, scores: dict[tuple[str, str], dict[str, np.ndarray]],
                   reps: int) -> tuple[list[list[str]], list[tuple[str, tuple, tuple]]]:
    """Per algorithm over the tasks it has: IQM and mean with CIs. Also returns the plot rows."""
    rows, plot = [], []
    for name in sorted({name for per_task in scores.values() for name in per_task}):
        group = [per_task[name] for per_task in scores.values() if name in per_task]
        iqm_ci = interval_estimate(rng, aggregate_iqm, [group], reps)
        mean_ci = interval_estimate(rng, aggregate_mean, [group], reps)
        rows.append([f"`{name}`", len(group), sum(len(g) for g in group), ci_text(*iqm_ci), ci_text(*mean_ci)])
        plot.append((name, iqm_ci, mean_ci))
    return rows, plot


def improvement_rows(rng: np.random.Generator, scores: dict[tuple[str, str], dict[str, np.ndarray]],
                     reps: int) -> tuple[list[list[str]], list[tuple[str, tuple]]]:
    """P(X > Y) with its CI for every pair, over the tasks both algorithms have."""
    names = sorted({name for per_task in scores.values() for name in per_task})
    rows, plot = [], []
    for i, x in enumerate(names):
        for y in names[i + 1:]:
            common = [per_task for per_task in scores.values() if x in per_task and y in per_task]
            if not common:
                rows.append([f"`{x}`", f"`{y}`", 0, "— (no common task)"])
                continue
            estimate = interval_estimate(rng, probability_of_improvement,
                                         [[t[x] for t in common], [t[y] for t in common]], reps)
            rows.append([f"`{x}`", f"`{y}`", len(common), ci_text(*estimate)])
            plot.append((f"P({x} > {y})", estimate))
    return rows, plot


# ---------------------------------------------------------------- plots


def pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(path: str, title: str, metric: str, curves: dict[str, tuple], colours: dict[str, str]) -> None:
    """curves: algorithm -> (steps, mean, lo, hi, seeds)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, (steps, mean, lo, hi, seeds) in curves.items():
        style = "--" if ":" in name else "-"
        ax.plot(steps, mean, style, color=colours[name], marker="." if len(steps) < 40 else None,
                label=f"{name} ({seeds} seed{'s' if seeds != 1 else ''})")
        ax.fill_between(steps, lo, hi, color=colours[name], alpha=0.2)
    ax.set_xlabel("env steps (step_count)")
    ax.set_ylabel(metric.replace("_", " "))
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    save_figure(fig, path)


def plot_intervals(path: str, title: str, panels: Sequence[tuple[str, list[tuple[str, tuple]]]],
                   colours: dict[str, str], reference: Optional[float] = None) -> None:
    """One panel per (x label, rows); a row is (label, (point, lo, hi)), drawn as a bar from lo to hi
    with a tick at the point (rliable's interval-estimate plot)."""
    plt = pyplot()
    height = max(2.0, 0.6 * max(len(rows) for _, rows in panels) + 1.2)
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels) + 2, height), squeeze=False)
    for ax, (xlabel, rows) in zip(axes[0], panels):
        for i, (label, (point, lo, hi)) in enumerate(rows):
            colour = colours.get(label, "C0")
            ax.barh(i, hi - lo, left=lo, height=0.6, color=colour, alpha=0.6)
            ax.vlines(point, i - 0.3, i + 0.3, color="black", linewidth=2)
        ax.set_yticks(range(len(rows)), [label for label, _ in rows])
        ax.use_sticky_edges = False  # margins round the bars, so an interval at the edge stays visible
        ax.margins(x=0.05)
        if reference is not None:
            ax.axvline(reference, color="grey", linestyle="--", linewidth=1)
        ax.set_xlabel(xlabel)
        ax.grid(axis="x", alpha=0.3)
    for ax in axes[0][1:]:
        ax.set_yticklabels([])
    fig.suptitle(title)
    save_figure(fig, path)


# ---------------------------------------------------------------- the report


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)


def inputs_section(rows: Sequence[dict]) -> str:
    table = markdown_table(
        ["file", "env (file → here)", "task", "algorithm (file → here)", "seeds"],
        [[f"`{r['path']}`", f"{r['env']} → {canonical_env(r['env'])}", r["task"],
          f"{r['algorithm']} → `{r['name']}`", ", ".join(r["seeds"])] for r in rows])
    return "## Inputs\n\n" + table + "\n"


def budget_note(tasks: dict[tuple[str, str], dict[str, Runs]], metric: str) -> str:
    """A warning for each task whose algorithms' last evaluations differ by more than 1% in steps."""
    notes = []
    for (env, task), algorithms in tasks.items():
        last = {}
        for name, runs in sorted(algorithms.items()):
            ends = [evaluations(run, metric)[0] for run in runs.values()]
            ends = [steps[-1] for steps in ends if steps.size]
            if ends:
                last[name] = max(ends)
        if last and max(last.values()) > 1.01 * min(last.values()):
            budgets = ", ".join(f"`{name}` {steps:,.0f}" for name, steps in last.items())
            notes.append(f"**Budgets differ** on {env}/{task} (last evaluation's step_count): {budgets}.")
    return "\n".join(notes)


def normalisation_text(mode: str, ranges: dict[tuple[str, str], tuple[float, float]]) -> str:
    if mode == "raw":
        return "Scores are raw (not normalised)" + (" (one task)." if len(ranges) == 1 else ".")
    bounds = "; ".join(f"{env}/{task}: [{lo:.3f}, {hi:.3f}]" for (env, task), (lo, hi) in ranges.items())
    return ("Scores are min-max normalised per task, `(s - lo) / (hi - lo)`, with lo/hi the smallest/largest "
            "value of the metric recorded for that task in any input (every algorithm, seed, evaluation and "
            f"absolute metric): {bounds}.")


def task_section(rng: np.random.Generator, env: str, task: str, algorithms: dict[str, Runs], metric: str,
                 out: str, reps: int, colours: dict[str, str]) -> str:
    """One task's curve figure (written) and table (returned as markdown)."""
    curves = {}
    for name, runs in sorted(algorithms.items()):
        aligned = aligned_curves(runs, metric)
        if aligned is not None:
            curves[name] = (aligned[0], *curve_band(rng, aligned[1], reps), aligned[1].shape[0])
    figure = f"curve_{slug(metric)}_{slug(env)}_{slug(task)}.png"
    plot_curves(os.path.join(out, figure), f"{env} {task}: mean over seeds, 95% bootstrap CI", metric,
                curves, colours)
    table = markdown_table(
        ["algorithm", "seeds", "steps", "final evaluation", "absolute metric", "IQM of score [95% CI]"],
        per_task_rows(rng, algorithms, metric, reps))
    return f"#### {env} / {task}\n\n![{env} {task}]({figure})\n\n{table}\n"


def aggregate_section(rng: np.random.Generator, scores: dict[tuple[str, str], dict[str, np.ndarray]], mode: str,
                      ranges: dict[tuple[str, str], tuple[float, float]], metric: str, out: str, reps: int,
                      colours: dict[str, str]) -> str:
    """The aggregate table and its IQM figure (written); ``scores`` normalised by ``mode`` with ``ranges``."""
    rows, plot = aggregate_rows(rng, scores, reps)
    covered = {frozenset(key for key, per_task in scores.items() if name in per_task)
               for per_task in scores.values() for name in per_task}
    plural = "s" if len(scores) != 1 else ""
    text = (f"Runs = seeds x tasks ({len(scores)} task{plural}). {normalisation_text(mode, ranges)} "
            f"IQM = mean of the middle 50% of the pooled runs; 95% stratified-bootstrap percentile CIs "
            f"({reps} replicates, runs resampled within each task).")
    if len(covered) > 1:
        text += (" Algorithms cover different task sets here, so their aggregates are not directly comparable; "
                 "the probability of improvement below uses only the tasks both have.")
    figure = f"iqm_{slug(metric)}.png"
    plot_intervals(os.path.join(out, figure), f"{metric} ({'raw' if mode == 'raw' else 'min-max normalised'})",
                   [("IQM", [(n, i) for n, i, _ in plot]), ("mean", [(n, m) for n, _, m in plot])], colours)
    table = markdown_table(["algorithm", "tasks", "runs", "IQM [95% CI]", "mean [95% CI]"], rows)
    return f"### Aggregate over tasks\n\n{text}\n\n{table}\n\n![IQM]({figure})\n"


def improvement_section(rng: np.random.Generator, scores: dict[tuple[str, str], dict[str, np.ndarray]],
                        metric: str, out: str, reps: int, colours: dict[str, str]) -> str:
    """The probability-of-improvement table and figure (written)."""
    rows, plot = improvement_rows(rng, scores, reps)
    text = ("P(X > Y): the probability that a run of X scores higher than a run of Y on a task, averaged over "
            "the tasks both have (Mann-Whitney U / (n m), ties 1/2); 95% CI from resampling X's and Y's runs "
            "independently within each task. P(Y > X) = 1 - P(X > Y).")
    table = markdown_table(["X", "Y", "tasks", "P(X > Y) [95% CI]"], rows)
    section = f"### Probability of improvement\n\n{text}\n\n{table}\n"
    if plot:
        figure = f"poi_{slug(metric)}.png"
        plot_intervals(os.path.join(out, figure), f"probability of improvement, {metric}",
                       [("P(X > Y)", plot)], colours, reference=0.5)
        section += f"\n![probability of improvement]({figure})\n"
    return section


def metric_section(rng: np.random.Generator, results: Results, metric: str, out: str, reps: int,
                   normalisation: str, colours: dict[str, str]) -> str:
    """The markdown for one metric; writes its curve, IQM and POI figures."""
    tasks = {key: algs for key, algs in sorted(results.items()) if task_scores(algs, metric)}
    if not tasks:
        return f"## {metric}\n\nNo input holds `{metric}`.\n"
    parts = [f"## {metric}\n", "### Per task\n",
             "Score of a run: its absolute metric where present (marl-eval convention), else its last "
             "evaluation. ± is the sample std over seeds (ddof=1; none for one seed); IQM with its 95% "
             "bootstrap CI over seeds; steps: the last evaluation's `step_count`.\n"]
    parts += [task_section(rng, env, task, algs, metric, out, reps, colours) for (env, task), algs in tasks.items()]
    mode = normalisation if normalisation != "auto" else ("raw" if len(tasks) == 1 else "minmax")
    ranges = {key: task_range(algs, metric) for key, algs in tasks.items()}
    scores = {key: {name: (s if mode == "raw" else normalise(s, *ranges[key]))
                    for name, s in task_scores(algs, metric).items()} for key, algs in tasks.items()}
    parts.append(aggregate_section(rng, scores, mode, ranges, metric, out, reps, colours))
    budgets = budget_note(tasks, metric)
    if budgets:
        parts.append(budgets + "\n")
    parts.append(improvement_section(rng, scores, metric, out, reps, colours))
    return "\n".join(parts)


def build_report(paths: Sequence[str], out: str, metrics: Sequence[str] = ("mean_episode_return",),
                 labels: Sequence[tuple[str, str]] = (), renames: Optional[dict[str, str]] = None,
                 normalisation: str = "auto", reps: int = 5000, seed: int = 0,
                 title: str = "Comparison report", command: Optional[str] = None,
                 max_steps: Optional[float] = None) -> str:
    """Reads the files, writes ``out/report.md`` and the figures; returns the markdown's path."""
    results, rows = read_results(paths, labels, renames, max_steps)
    names = sorted({name for algorithms in results.values() for name in algorithms})
    colours = {name: f"C{i % 10}" for i, name in enumerate(names)}
    rng = np.random.default_rng(seed)
    parts = [f"# {title}\n"]
    if command:
        parts.append(f"Written by:\n\n```\n{command}\n```\n")
    parts.append(inputs_section(rows))
    if max_steps is not None:
        parts.append(f"Cut at {max_steps:,.0f} steps (`--max-steps`): evaluations after it are dropped, and a run "
                     "that had any loses its absolute metric, so its score is its last evaluation kept.\n")
    if any(row["label"] == "mava" or "mava" in row["name"].lower() for row in rows):
        parts.append(f"Note: {MAVA_NOTE}\n")
    parts += [metric_section(rng, results, metric, out, reps, normalisation, colours) for metric in metrics]
    parts.append("## Method\n\nStatistics after Agarwal et al. 2021, \"Deep Reinforcement Learning at the Edge of "
                 "the Statistical Precipice\" (NeurIPS; the estimators of its `rliable` library, written in numpy): "
                 "IQM = `scipy.stats.trim_mean(x, 0.25)` over pooled runs x tasks; stratified bootstrap "
                 "(runs resampled with replacement within each task) with percentile 95% CIs; probability of "
                 f"improvement as above. Bootstrap: {reps} replicates, numpy Generator seed {seed}.\n")
    path = os.path.join(out, "report.md")
    atomic_write_text(path, "\n".join(parts))
    return path


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+", help="marl-eval JSON files (quoted globs are expanded)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--metric", nargs="+", default=["mean_episode_return"])
    parser.add_argument("--label", action="append", default=[], metavar="NAME=GLOB",
                        help="prefix algorithms from files matching GLOB with NAME: (default: mava for .../mava/...)")
    parser.add_argument("--rename", action="append", default=[], metavar="OLD=NEW",
                        help="rename a shown algorithm name (after labelling)")
    parser.add_argument("--normalise", choices=["auto", "minmax", "raw"], default="auto")
    parser.add_argument("--reps", type=int, default=5000, help="bootstrap replicates")
    parser.add_argument("--seed", type=int, default=0, help="numpy Generator seed of the bootstrap")
    parser.add_argument("--title", default="Comparison report")
    parser.add_argument("--max-steps", type=float, default=None,
                        help="compare at one budget: drop evaluations after this step_count (and then the "
                             "absolute metric, which was measured later)")
    args = parser.parse_args(argv)
    words = sys.argv if argv is None else [os.path.relpath(os.path.abspath(__file__)), *argv]
    command = "python " + " ".join(shlex.quote(word) for word in words)
    path = build_report(expand_paths(args.files), args.out, args.metric, [parse_pair(t) for t in args.label],
                        dict(parse_pair(t) for t in args.rename), args.normalise, args.reps, args.seed,
                        args.title, command, args.max_steps)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
