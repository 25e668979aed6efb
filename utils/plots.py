"""Compare algorithms from a marl-eval JSON: one curve per algorithm (mean over seeds, min-max band).

    python -m utils.plots results.json --env lbf --task 10x10-3p-3f --out comparison.png
    python -m utils.plots results.json --env smax --task 3m --metric win_rate --out smax.png

Reads the layout ``utils.logging.MarlEvalJson`` writes (``env -> task -> algorithm -> seed_k ->
step_k``); several runs share one file through ``logger.json_path``. Also prints, per algorithm, the
final mean ± std over seeds and the absolute metric, so the numbers behind the plot are in the log.

Our runs are named ``<ff|rec>_<system>_<shared|separate>`` (``Settings.algorithm_label``): the legend
reads "system (shared)" and both variants of one system share its colour, separate parameters dashed.
Other names (Mava's ``ff_mappo``, older files' ``mappo``) are drawn as they are.
"""

from __future__ import annotations

import argparse
import json
import re
from typing import Any, NamedTuple

import numpy as np

from utils.logging import save_figure


class Label(NamedTuple):
    system: str  # the colour key: ours "<ff|rec>_<system>_*" (both sharings), others their own name
    sharing: str | None  # "shared" | "separate" | None (not one of our names)
    text: str  # legend text


def parse_label(algorithm: str) -> Label:
    """``ff_a2po_separate`` -> Label("ff_a2po_*", "separate", "a2po (separate)"); ``rec_`` keeps its prefix.
    A sweep's combination (``ff_mappo_shared[actor_lr=0.001]``) gets its own colour and keeps its values."""
    match = re.fullmatch(r"(ff|rec)_(.+?)_(shared|separate)(\[.*\])?", algorithm)
    if not match:
        return Label(algorithm, None, algorithm)
    kind, system, sharing, combo = match.groups()
    name = system if kind == "ff" else f"rec_{system}"
    combo = combo or ""
    return Label(f"{kind}_{system}_*{combo}", sharing, f"{name} ({sharing})" + (f" {combo}" if combo else ""))


def curves(data: dict[str, Any], env: str, task: str, metric: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """algorithm -> (steps (K,), values (K, S)) over the evaluations every seed has."""
    if env not in data or task not in data[env]:
        available = sorted(f"{e}/{t}" for e in data for t in data[e])
        raise SystemExit(f"no results for {env}/{task} in the JSON; it holds: {', '.join(available) or 'nothing'}")
    out = {}
    for algorithm, seeds in sorted(data[env][task].items()):
        per_seed = []
        for runs in seeds.values():
            evals = sorted((k for k in runs if k.startswith("step_")), key=lambda k: int(k.split("_")[1]))
            per_seed.append([(runs[k]["step_count"], runs[k][metric][0]) for k in evals if metric in runs[k]])
        length = min(len(s) for s in per_seed)
        if length == 0:
            continue
        steps = np.array([step for step, _ in per_seed[0][:length]], dtype=float)
        values = np.array([[value for _, value in s[:length]] for s in per_seed], dtype=float).T
        out[algorithm] = (steps, values)
    return out


def absolute(data: dict[str, Any], env: str, task: str, algorithm: str, metric: str) -> np.ndarray:
    seeds = data[env][task][algorithm].values()
    return np.array([r["absolute_metrics"][metric][0] for r in seeds if metric in r.get("absolute_metrics", {})])


def plot_comparison(json_path: str, env: str, task: str, out: str, metric: str = "mean_episode_return",
                    title: str | None = None) -> list[str]:
    """Writes the plot (atomically) and returns one summary line per algorithm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(json_path) as f:
        data = json.load(f)
    found = curves(data, env, task, metric)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    labels = {algorithm: parse_label(algorithm) for algorithm in found}
    colours = {system: f"C{i}" for i, system in enumerate(dict.fromkeys(label.system for label in labels.values()))}
    lines = []
    for algorithm, (steps, values) in found.items():
        label = labels[algorithm]
        mean, colour = values.mean(axis=1), colours[label.system]
        ax.plot(steps, mean, color=colour, linestyle="--" if label.sharing == "separate" else "-",
                label=f"{label.text} ({values.shape[1]} seeds)")
        if values.shape[1] > 1:
            ax.fill_between(steps, values.min(axis=1), values.max(axis=1), color=colour,
                            alpha=0.1 if label.sharing == "separate" else 0.2)
        final = values[-1]
        best = absolute(data, env, task, algorithm, metric)
        line = (f"{label.text}: final {metric} {final.mean():.3f} ± {final.std():.3f} at {steps[-1]:,.0f} steps "
                f"(seeds: {', '.join(f'{v:.3f}' for v in final)})")
        if best.size:
            line += f"; absolute metric {best.mean():.3f} ± {best.std():.3f}"
        lines.append(line)
    ax.set_xlabel("env steps")
    ax.set_ylabel(metric.replace("_", " "))
    ax.set_title(title or f"{env} {task}: mean over seeds, min-max band")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    save_figure(fig, out)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("json_path")
    parser.add_argument("--env", required=True)
    parser.add_argument("--task", required=True)
    parser.add_argument("--metric", default="mean_episode_return")
    parser.add_argument("--out", required=True)
    parser.add_argument("--title", default=None)
    args = parser.parse_args()
    for line in plot_comparison(args.json_path, args.env, args.task, args.out, args.metric, args.title):
        print(line)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
