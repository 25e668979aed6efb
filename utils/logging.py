"""Run output: console progress, marl-eval JSON results and a learning-curve plot.

The JSON follows marl-eval's layout ``env -> task -> algorithm -> seed_k -> step_k`` with
``step_count``, ``mean_episode_return``, ``win_rate`` (where the env has one) and
``steps_per_second``, plus ``absolute_metrics``. Appending to an existing file keeps other runs.
Files are written atomically (temp file + rename).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from typing import Any, Optional

import numpy as np


def atomic_write_text(path: str, text: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class MarlEvalJson:
    """Accumulates evaluation results of all seeds of one run in marl-eval's JSON layout."""

    def __init__(self, path: str, env_name: str, task: str, algorithm: str, seeds: list[int]):
        self.path, self.seeds = path, seeds
        self.keys = (env_name, task, algorithm)
        self.data: dict[str, Any] = {}
        if os.path.exists(path):
            with open(path) as f:
                self.data = json.load(f)
        runs = self.data.setdefault(env_name, {}).setdefault(task, {}).setdefault(algorithm, {})
        for seed in seeds:
            runs[f"seed_{seed}"] = {}  # a rerun of a seed replaces it
        self.runs = runs

    def add(self, eval_index: int, step: int, metrics: dict[str, np.ndarray], elapsed: float) -> None:
        """``metrics``: name -> per-seed values (S,)."""
        for i, seed in enumerate(self.seeds):
            entry = {"step_count": int(step), "elapsed_time": float(elapsed)}
            entry.update({name: [float(values[i])] for name, values in metrics.items()})
            self.runs[f"seed_{seed}"][f"step_{eval_index}"] = entry

    def add_absolute(self, metrics: dict[str, np.ndarray]) -> None:
        for i, seed in enumerate(self.seeds):
            self.runs[f"seed_{seed}"]["absolute_metrics"] = {
                name: [float(values[i])] for name, values in metrics.items()
            }

    def write(self) -> None:
        atomic_write_text(self.path, json.dumps(self.data, indent=1))


class Console:
    """One quiet line per evaluation; a live progress bar (steps, steps/s, return, ETA) on a tty."""

    def __init__(self, total_steps: int, enabled: bool = True):
        self.total = total_steps
        self.progress = None
        if enabled and sys.stdout.isatty():
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(),
                TextColumn("{task.completed:,.0f}/{task.total:,.0f} steps"),
                TextColumn("{task.fields[info]}"), TimeRemainingColumn(),
            )
            self.task = self.progress.add_task("training", total=total_steps, info="")
            self.progress.start()

    def print(self, text: str) -> None:
        if self.progress is not None:
            self.progress.console.print(text)
        else:
            print(text, flush=True)

    def update(self, step: int, info: str) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=step, info=info)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()


def plot_curve(path: str, steps: np.ndarray, returns: np.ndarray, title: str, ylabel: str = "mean episode return") -> None:
    """Learning curve: mean over seeds with min-max band. ``returns``: (num_evals, S)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    mean = returns.mean(axis=1)
    ax.plot(steps, mean, label=f"mean of {returns.shape[1]} seed(s)")
    if returns.shape[1] > 1:
        ax.fill_between(steps, returns.min(axis=1), returns.max(axis=1), alpha=0.25, label="min-max")
    ax.set_xlabel("env steps")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".tmp-{os.getpid()}-{time.time_ns()}.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
