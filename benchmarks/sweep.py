"""An in-program sweep against one plain run of the same task: wall time, compile time, steps/s.

    python benchmarks/sweep.py                                   # mappo lbf 8x8, 4 lrs x 3 seeds, 500k steps
    python benchmarks/sweep.py --system a2po --steps 200000 --values 1e-4 1e-3

Runs ``systems/<system>_anakin.py`` twice in fresh processes (the persistent compilation cache off,
so compile times are real; checkpoints, plots and the progress bar off): once plain with
``system.<key>=<first value>`` and ``arch.num_seeds=<seeds>``, once with
``+sweep.system.<key>=[values]`` (values x seeds runs in one program). It reads each run's own
console lines ("compiled in", "trained ... in") and the process's wall time, and writes
``benchmarks/results/sweep.md`` (+ ``.json``) with the sweep's absolute metric per combination.
Running the plain command once per value instead of the sweep costs about ``len(values)`` times the
plain run's wall time; the table says how much of that the sweep saves.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from utils.logging import atomic_write_text  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--system", default="mappo")
    parser.add_argument("--env", default="lbf")
    parser.add_argument("--task", default="8x8-2p-2f-coop")
    parser.add_argument("--key", default="actor_lr", help="the swept system key")
    parser.add_argument("--values", nargs="+", default=["1e-4", "3e-4", "1e-3", "3e-3"])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=500_000, help="arch.total_timesteps per run")
    parser.add_argument("--evaluations", type=int, default=10, help="arch.num_evaluation")
    parser.add_argument("--set", nargs="*", default=[], help="extra overrides for both runs")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "sweep"))
    return parser.parse_args(argv)


def run(args: argparse.Namespace, overrides: list[str], base_dir: str) -> dict:
    command = [sys.executable, os.path.join(ROOT, "systems", f"{args.system}_anakin.py"), f"env={args.env}",
               f"env.task={args.task}", f"arch.total_timesteps={args.steps}", f"arch.num_evaluation={args.evaluations}",
               f"arch.num_seeds={args.seeds}", "arch.compilation_cache=off", "logger.progress=false", "logger.plot=false",
               "logger.checkpoint.enabled=false", f"logger.base_dir={base_dir}", *args.set, *overrides]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    text = done.stdout
    compiled = float(re.search(r"compiled in ([\d.]+)s", text).group(1))
    trained = re.search(r"trained ([\d,]+) steps in ([\d.]+)s", text)
    steps, seconds = int(trained.group(1).replace(",", "")), float(trained.group(2))
    rows = re.findall(r"^  (\[.*?\])\s+(-?[\d.]+) ±([\d.]+)$", text, re.M)
    shown = " ".join(["python", *command[1:]]).replace(ROOT + "/", "").replace(base_dir, "<tmp>")
    return {"command": shown, "wall_s": wall,
            "compile_s": compiled, "train_s": seconds, "steps": steps, "steps_per_s": steps / seconds,
            "absolute": [(label, float(m), float(s)) for label, m, s in rows]}


def machine() -> str:
    import platform

    import jax

    return (f"Machine: {platform.machine()} CPU, {os.cpu_count()} cores (the default: one XLA device per core), "
            f"jax {jax.__version__}, {time.strftime('%Y-%m-%d')}; nothing else running.")


def markdown(args: argparse.Namespace, plain: dict, swept: dict) -> str:
    n = len(args.values)
    lines = [f"# In-program sweep vs one run: {args.system} on {args.env}/{args.task}", "", machine(), "",
             f"{n} values of `system.{args.key}` x {args.seeds} seeds = {n * args.seeds} runs in one program, "
             f"{args.steps:,} steps per run, {args.evaluations} evaluations. Fresh processes, compilation cache off.",
             "", "Command: `" + " ".join(["python benchmarks/sweep.py", *sys.argv[1:]]) + "`", "",
             "| | runs | process wall (s) | compile (s) | training (s) | env steps/s (all runs) |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, r, runs in (("one run", plain, args.seeds), ("sweep", swept, n * args.seeds)):
        lines.append(f"| {name} | {runs} | {r['wall_s']:.1f} | {r['compile_s']:.1f} | {r['train_s']:.1f} | "
                     f"{r['steps_per_s']:,.0f} |")
    lines += ["", f"- sweep / one run: wall {swept['wall_s'] / plain['wall_s']:.2f}x, compile "
              f"{swept['compile_s'] / plain['compile_s']:.2f}x, training {swept['train_s'] / plain['train_s']:.2f}x "
              f"for {n}x the runs; {n} separate runs would take about {n * plain['wall_s']:.0f} s "
              f"(sweep: {swept['wall_s']:.0f} s, {n * plain['wall_s'] / swept['wall_s']:.2f}x faster).",
              "", "Absolute metric per combination (mean ± std over seeds), best first:", "",
              "| combination | return |", "|---|---:|"]
    lines += [f"| `{label}` | {mean:.3f} ± {std:.3f} |" for label, mean, std in swept["absolute"]]
    lines += ["", "Commands:", "", f"- one run: `{plain['command']}`", f"- sweep: `{swept['command']}`", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as base:
        plain = run(args, [f"system.{args.key}={args.values[0]}"], base)
        swept = run(args, [f"+sweep.system.{args.key}=[{','.join(args.values)}]"], base)
    text = markdown(args, plain, swept)
    atomic_write_text(args.out + ".md", text)
    atomic_write_text(args.out + ".json", json.dumps({"args": vars(args), "plain": plain, "sweep": swept}, indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
