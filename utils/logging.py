"""Run output: console progress, marl-eval JSON results and a learning-curve plot.

The JSON follows marl-eval's layout ``env -> task -> algorithm -> seed_k -> step_k`` with
``step_count``, ``elapsed_time``, ``mean_episode_return``, ``mean_episode_length``, ``win_rate``
(where the env has one) and ``steps_per_second`` (training), plus ``absolute_metrics``. Every value is
a one-element list, as marl-eval's own ``JsonLogger`` writes them. Writing merges this run's seeds
into whatever the file already holds (other runs, algorithms, tasks), under a file lock, and
replaces the file atomically (temp file + rename).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import tempfile
import time
from typing import Any, Callable, Iterator, Optional, Sequence, TextIO, Union

import numpy as np


def atomic_write_text(path: str, text: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp's 0600 would make results unreadable to others
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def file_lock(path: str) -> Iterator[None]:
    """An advisory lock on ``.<name>.lock`` next to ``path`` (POSIX); a no-op without ``fcntl``."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    lock = os.path.join(os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}.lock")
    with open(lock, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class MarlEvalJson:
    """This run's evaluations (all its seeds) in marl-eval's layout, merged into ``path`` on ``write``.

    ``step_k`` is the k-th evaluation during training (after k+1 update chunks, as many entries as
    Mava writes for the same ``num_evaluation``); a rerun of a seed replaces that seed's entries.
    ``algorithm`` is one name for every seed, or one name per seed (an in-program sweep: one
    algorithm per combination, ``seeds`` then lists each run's seed).
    """

    def __init__(self, path: str, env_name: str, task: str, algorithm: Union[str, Sequence[str]], seeds: list[int]):
        self.path, self.seeds = path, seeds
        names = [algorithm] * len(seeds) if isinstance(algorithm, str) else list(algorithm)
        if len(names) != len(seeds):
            raise ValueError(f"{len(names)} algorithm names for {len(seeds)} seeds")
        self.keys = (env_name, task)
        self.slots = [(name, f"seed_{seed}") for name, seed in zip(names, seeds)]  # per run: (algorithm, seed_k)
        if len(set(self.slots)) != len(self.slots):
            raise ValueError(f"two runs share an (algorithm, seed) entry: {self.slots}")
        self.runs: dict[tuple[str, str], dict[str, Any]] = {slot: {} for slot in self.slots}

    def add(self, eval_step: int, step: int, metrics: dict[str, np.ndarray], elapsed: float) -> None:
        """``metrics``: name -> per-run values (S,)."""
        for i, slot in enumerate(self.slots):
            entry: dict[str, Any] = {"step_count": int(step), "elapsed_time": float(elapsed)}
            entry.update({name: [float(values[i])] for name, values in metrics.items()})
            self.runs[slot][f"step_{eval_step}"] = entry

    def add_absolute(self, metrics: dict[str, np.ndarray]) -> None:
        for i, slot in enumerate(self.slots):
            self.runs[slot]["absolute_metrics"] = {name: [float(values[i])] for name, values in metrics.items()}

    def write(self) -> None:
        env_name, task = self.keys
        with file_lock(self.path):
            data: dict[str, Any] = {}
            if os.path.exists(self.path):
                with open(self.path) as f:
                    data = json.load(f)
            algorithms = data.setdefault(env_name, {}).setdefault(task, {})
            for (algorithm, seed), entries in self.runs.items():
                algorithms.setdefault(algorithm, {})[seed] = entries
            atomic_write_text(self.path, json.dumps(data, indent=1))


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else (f"{minutes}m{secs:02d}s" if minutes else f"{secs}s")


class Console:
    """Progress for people: a live bar (steps, steps/s, latest return, ETA) on a terminal, and one
    plain line every ``every`` evaluations (default: about 20 lines a run), so logs stay readable
    when the output is a file or a pipe."""

    def __init__(self, total_steps: int, num_evaluation: int, progress: bool = True,
                 every: Optional[int] = None, stream: Optional[TextIO] = None,
                 sink: Optional[Callable[[str], None]] = None):
        self.total, self.num_evaluation = total_steps, num_evaluation
        self.every = every or max(1, round(num_evaluation / 20))
        self.stream = stream or sys.stdout
        self.sink = sink  # when given, every line goes there and there is no live bar
        self.marks = [(time.perf_counter(), 0)]  # (time, step) at the start and at each evaluation
        self.progress: Any = None
        if progress and sink is None and hasattr(self.stream, "isatty") and self.stream.isatty():
            from rich.console import Console as RichConsole
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(
                TextColumn("[bold]training"), BarColumn(),
                TextColumn("{task.completed:,.0f}/{task.total:,.0f} steps"),
                TextColumn("{task.fields[info]}"), TextColumn("ETA"), TimeRemainingColumn(),
                console=RichConsole(file=self.stream), transient=False,
            )
            self.task = self.progress.add_task("training", total=total_steps, info="")
            self.progress.start()

    def print(self, text: str) -> None:
        if self.sink is not None:
            self.sink(text)
        elif self.progress is not None:
            self.progress.console.print(text, highlight=False, markup=False)
        else:
            print(text, file=self.stream, flush=True)

    def start(self, step: int) -> None:
        """Training (re)starts at ``step``: the origin of the ETA estimate."""
        self.marks = [(time.perf_counter(), step)]
        if self.progress is not None:
            self.progress.update(self.task, completed=step)

    def eta(self) -> float:
        """Seconds left at the pace since the first evaluation (on a resumed run that one includes
        compiling the evaluator); from the start until then."""
        (t0, s0), (t1, s1) = self.marks[1 if len(self.marks) > 2 else 0], self.marks[-1]
        if s1 <= s0:
            return float("nan")
        return (t1 - t0) / (s1 - s0) * (self.total - s1)

    def evaluation(self, index: int, step: int, summary: str, short: str, detail: str = "") -> None:
        """After evaluation ``index`` (1-based) at ``step``: a full line (and ``detail`` under it) when
        due, the bar always."""
        self.marks.append((time.perf_counter(), step))
        if index % self.every == 0 or index == self.num_evaluation or index == 1:
            width = len(str(self.num_evaluation))
            percent = 100.0 * step / max(self.total, 1)
            self.print(f"[{index:>{width}}/{self.num_evaluation} {percent:3.0f}%] {summary}  "
                       f"ETA {format_duration(self.eta())}")
            if detail:
                self.print(f"{' ' * (2 * width + 8)}{detail}")
        if self.progress is not None:
            self.progress.update(self.task, completed=step, info=short)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def plot_learning_curve(
    path: str,
    steps: np.ndarray,
    returns: np.ndarray,
    title: str,
    win_rates: Optional[np.ndarray] = None,
    absolute: Optional[np.ndarray] = None,
    groups: Optional[Sequence[str]] = None,
) -> None:
    """Mean over seeds with a min-max band; a win-rate panel when given. Arrays: (num_evals, S).
    ``groups`` (one label per column, e.g. a sweep's combinations): one curve per label."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("mean episode return", returns)]
    if win_rates is not None:
        panels.append(("win rate (%)", win_rates))
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    for ax, (label, values) in zip(axes[0], panels):
        values = np.asarray(values, dtype=float)
        if groups is None:
            ax.plot(steps, values.mean(axis=1), marker="." if len(steps) < 40 else None,
                    label=f"mean of {values.shape[1]} seed(s)")
            if values.shape[1] > 1:
                ax.fill_between(steps, values.min(axis=1), values.max(axis=1), alpha=0.25, label="min-max over seeds")
        else:
            for name in dict.fromkeys(groups):  # first-seen order
                part = values[:, [i for i, g in enumerate(groups) if g == name]]
                (line,) = ax.plot(steps, part.mean(axis=1), label=f"{name} ({part.shape[1]} seed(s))")
                if part.shape[1] > 1:
                    ax.fill_between(steps, part.min(axis=1), part.max(axis=1), alpha=0.15, color=line.get_color())
        if absolute is not None and groups is None and label.startswith("mean episode return"):
            ax.axhline(float(np.mean(absolute)), color="grey", linestyle="--", linewidth=1,
                       label=f"absolute metric {float(np.mean(absolute)):.3g}")
        ax.set_xlabel("env steps")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle(title)
    save_figure(fig, path)


def save_figure(fig: Any, path: str) -> None:
    """Writes a matplotlib figure atomically (temp file + rename) and closes it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".tmp-{os.getpid()}-{time.time_ns()}.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
