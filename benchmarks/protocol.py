"""Mava's evaluation protocol over systems x tasks x seeds, resumable, into one marl-eval JSON.

    python benchmarks/protocol.py --preset cpu --systems mappo a2po --tasks lbf:8x8-2p-2f-coop connector:con-5x5x3a
    python benchmarks/protocol.py --preset mava --systems mappo ippo --tasks rware:tiny-2ag --out results/protocol/rware
    python benchmarks/protocol.py --preset cpu ... --set network.parameter_sharing=separate --report
    python benchmarks/protocol.py --list-presets

Every (system, task) pair is one run of ``systems/<system>_anakin.py`` in its own process, with all
of the preset's seeds vmapped in one program (``arch.num_seeds``), writing to ``<out>/results.json``
(algorithm names ``<ff|rec>_<system>_<shared|separate>``) and checkpointing into
``<out>/runs/<system>_<env>_<task>/``. Presets (``PRESETS``):

- ``mava``: the protocol of Mava's papers (Sable, ICML'25): 20M steps, 122 evaluations of 32
  episodes, the absolute metric on 320 episodes (10x), 10 seeds;
- ``cpu``: the same shape at a CPU budget: 2M steps, 20 evaluations of 32 episodes, 320 absolute
  episodes, 3 seeds;
- ``smoke``: a minute-scale check of the whole pipeline (60k steps, 2 evaluations, 1 seed).

Continue an interrupted sweep by running the same command again: finished runs (``done.json`` in
their folder) are skipped, a run that was killed continues from its last checkpoint
(``logger.resume``, bit-identical to an uninterrupted run), and runs never started start. The sweep's
settings are kept in ``<out>/sweep.json``; a second command with a different preset or ``--set`` for
the same ``--out`` is refused, so one folder never mixes budgets. ``--max-runs N`` stops after N runs
(e.g. one per job slot). At the end ``<out>/protocol.md`` lists every run with its status, time and
absolute metric, and ``--report`` writes ``benchmarks/report.py``'s statistics into ``<out>/report``
(add Mava's files there with ``--compare ../shared/data/mava/*.json``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from typing import Any, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import envs  # noqa: E402
from benchmarks import report  # noqa: E402
from utils import plots  # noqa: E402
from utils.checkpointing import committed_steps  # noqa: E402
from utils.logging import atomic_write_text  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Preset:
    total_timesteps: int
    num_evaluation: int
    num_eval_episodes: int
    num_absolute_metric_eval_episodes: int
    num_seeds: int
    note: str

    def overrides(self) -> list[str]:
        return [f"arch.total_timesteps={self.total_timesteps}", f"arch.num_evaluation={self.num_evaluation}",
                f"arch.num_eval_episodes={self.num_eval_episodes}",
                f"arch.num_absolute_metric_eval_episodes={self.num_absolute_metric_eval_episodes}",
                f"arch.num_seeds={self.num_seeds}", "arch.absolute_metric=true"]


PRESETS = {
    "mava": Preset(20_000_000, 122, 32, 320, 10, "Mava's papers (Sable, ICML'25): 20M steps, 122 x 32 episodes, 320 absolute"),
    "cpu": Preset(2_000_000, 20, 32, 320, 3, "the same shape at a CPU budget"),
    "smoke": Preset(61_440, 2, 8, 16, 1, "a quick check of the pipeline"),
}


@dataclasses.dataclass(frozen=True)
class Job:
    system: str
    env: str
    task: str

    @property
    def name(self) -> str:
        return f"{self.system}_{self.env}_{self.task}"


def parse_task(text: str) -> tuple[str, str]:
    """``env:task`` -> (env, task), checked against the env registry (clear errors before any run)."""
    env, sep, task = text.partition(":")
    if not sep or not env or not task:
        raise SystemExit(f"error: --tasks {text!r}: write env:task, e.g. lbf:8x8-2p-2f-coop")
    if env not in envs.FAMILIES:
        raise SystemExit(f"error: --tasks {text!r}: unknown env {env!r}; valid: {sorted(envs.FAMILIES)}")
    if task not in envs.tasks(env):
        raise SystemExit(f"error: --tasks {text!r}: unknown task {task!r} of {env}; valid: {envs.tasks(env)}")
    return env, task


def available_systems() -> list[str]:
    names = os.listdir(os.path.join(ROOT, "systems"))
    return sorted(n[: -len("_anakin.py")] for n in names if n.endswith("_anakin.py"))


def plan(systems: Sequence[str], tasks: Sequence[str]) -> list[Job]:
    known = available_systems()
    for system in systems:
        if system not in known:
            raise SystemExit(f"error: --systems {system!r}: no systems/{system}_anakin.py; valid: {known}")
    pairs = [parse_task(text) for text in tasks]
    return [Job(system, env, task) for env, task in pairs for system in systems]


def sweep_settings(preset_name: str, preset: Preset, extra: Sequence[str], systems: Sequence[str],
                   tasks: Sequence[str]) -> dict[str, Any]:
    return {"preset": preset_name, "arch": dataclasses.asdict(preset), "set": list(extra),
            "systems": list(systems), "tasks": list(tasks)}


def check_sweep(out: str, settings: dict[str, Any]) -> None:
    """Writes ``<out>/sweep.json`` or checks that a continued sweep has the same budget and overrides."""
    path = os.path.join(out, "sweep.json")
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        for key in ("arch", "set"):
            if saved.get(key) != settings[key]:
                raise SystemExit(f"error: {out} holds a sweep with {key} {saved.get(key)} (preset {saved.get('preset')}); "
                                 f"this command has {settings[key]} (preset {settings['preset']}). Use another --out, or "
                                 "the same preset and --set to continue it")
        settings = {**settings, "systems": sorted(set(saved.get("systems", [])) | set(settings["systems"])),
                    "tasks": sorted(set(saved.get("tasks", [])) | set(settings["tasks"]))}
    os.makedirs(out, exist_ok=True)
    atomic_write_text(path, json.dumps(settings, indent=1))


def run_dir(out: str, job: Job) -> str:
    return os.path.join(out, "runs", job.name)


def job_status(out: str, job: Job) -> str:
    """``done`` (finished), ``resume`` (killed after a checkpoint) or ``new``."""
    folder = run_dir(out, job)
    if os.path.exists(os.path.join(folder, "done.json")):
        return "done"
    return "resume" if committed_steps(os.path.join(folder, "checkpoints")) else "new"


def command(out: str, job: Job, preset: Preset, extra: Sequence[str], status: str) -> list[str]:
    folder = run_dir(out, job)
    args = [sys.executable, os.path.join(ROOT, "systems", f"{job.system}_anakin.py"), f"env={job.env}",
            f"env.task={job.task}", *preset.overrides(), "logger.progress=false", "logger.checkpoint.enabled=true",
            f"logger.json_path={os.path.join(out, 'results.json')}", f"logger.base_dir={os.path.join(out, 'runs')}",
            f"hydra.run.dir={folder}", *extra]
    if status == "resume":
        args.append(f"logger.resume={folder}")
    return args


def read_results(out: str) -> dict[str, Any]:
    """The sweep's marl-eval JSON (``{}`` before the first run wrote it)."""
    path = os.path.join(out, "results.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def absolute_of(results: dict[str, Any], job: Job) -> Optional[str]:
    """``mean ± std`` (over seeds, as in report.md) of the absolute return of each of the job's
    algorithm names in ``results``."""
    algorithms = results.get(job.env, {}).get(job.task, {})
    parts = []
    for name in sorted(a for a in algorithms if f"_{job.system}_" in f"_{a}_"):
        returns = plots.absolute(results, job.env, job.task, name, "mean_episode_return")
        if returns.size:
            parts.append(f"{name} {report.mean_std(returns)} ({returns.size} seeds)")
    return "; ".join(parts) or None


def run_job(out: str, job: Job, preset: Preset, extra: Sequence[str], status: str, verbose: bool) -> tuple[int, float]:
    """Runs one job to completion (or failure); its console goes to ``<out>/logs/<job>.log``."""
    folder = run_dir(out, job)
    if status == "new" and os.path.isdir(folder):
        shutil.rmtree(folder)  # a start killed before its first checkpoint: nothing to keep
    os.makedirs(os.path.join(out, "logs"), exist_ok=True)
    log_path = os.path.join(out, "logs", f"{job.name}.log")
    args = command(out, job, preset, extra, status)
    start = time.perf_counter()
    with open(log_path, "a") as log:
        log.write(f"\n== {time.strftime('%Y-%m-%d %H:%M:%S')} {status}: {' '.join(args)}\n")
        log.flush()
        proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            log.write(line)
            if verbose:
                print(f"  {line}", end="")
        proc.wait()
    seconds = time.perf_counter() - start
    if proc.returncode == 0:
        marker = os.path.join(folder, "done.json")
        atomic_write_text(marker, json.dumps({"seconds": seconds, "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
                                              "log": log_path}))
    return proc.returncode, seconds


def write_summary(out: str, jobs: Sequence[Job], preset_name: str, preset: Preset, extra: Sequence[str]) -> str:
    rows, results = [], read_results(out)
    for job in jobs:
        status = job_status(out, job)
        seconds = "-"
        marker = os.path.join(run_dir(out, job), "done.json")
        if status == "done":
            with open(marker) as f:
                seconds = f"{json.load(f)['seconds']:.0f}"
        rows.append(f"| {job.system} | {job.env}/{job.task} | {status} | {seconds} | {absolute_of(results, job) or '-'} |")
    text = "\n".join([
        f"# Protocol sweep: preset `{preset_name}`", "",
        f"{preset.note}: {preset.total_timesteps:,} steps, {preset.num_evaluation} evaluations x "
        f"{preset.num_eval_episodes} episodes, absolute metric on {preset.num_absolute_metric_eval_episodes} "
        f"episodes, {preset.num_seeds} seeds (vmapped in one program per run)."
        + (f" Overrides: `{' '.join(extra)}`." if extra else ""), "",
        "| system | task | status | seconds (last session) | absolute return (mean ± std over seeds) |",
        "|---|---|---|---|---|", *rows, "",
        f"Results: `{os.path.join(out, 'results.json')}` (marl-eval JSON); logs in `{os.path.join(out, 'logs')}`.", ""])
    path = os.path.join(out, "protocol.md")
    atomic_write_text(path, text)
    return path


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
    parser.add_argument("--systems", nargs="+", default=["mappo"])
    parser.add_argument("--tasks", nargs="+", default=["lbf:8x8-2p-2f-coop"], help="env:task ...")
    parser.add_argument("--out", default=None, help="sweep folder (default results/protocol/<preset>)")
    parser.add_argument("--set", nargs="*", default=[], dest="extra", metavar="KEY=VALUE",
                        help="Hydra overrides for every run (not arch.* sizes the preset sets)")
    parser.add_argument("--max-runs", type=int, default=None, help="stop after this many runs")
    parser.add_argument("--report", action="store_true", help="write benchmarks/report.py's report into <out>/report")
    parser.add_argument("--compare", nargs="*", default=[], help="more marl-eval JSON files for the report (e.g. Mava's)")
    parser.add_argument("--verbose", action="store_true", help="stream each run's console")
    parser.add_argument("--list-presets", action="store_true")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.list_presets:
        for name, preset in PRESETS.items():
            print(f"{name:6s} {preset.note}; " + " ".join(preset.overrides()))
        return 0
    preset = PRESETS[args.preset]
    taken = {o.split("=", 1)[0].lstrip("+") for o in preset.overrides()}
    for override in args.extra:
        key = override.split("=", 1)[0].lstrip("+")
        if "=" not in override or key in taken or key.startswith(("hydra.", "logger.json_path", "logger.base_dir",
                                                                   "logger.resume")):
            raise SystemExit(f"error: --set {override!r}: give KEY=VALUE for a key the protocol does not set "
                             f"(it sets {sorted(taken)}, the run folders, the JSON and resume)")
    if args.max_runs is not None and args.max_runs < 1:
        raise SystemExit(f"error: --max-runs {args.max_runs}: must be >= 1")
    jobs = plan(args.systems, args.tasks)
    out = os.path.abspath(args.out or os.path.join(ROOT, "results", "protocol", args.preset))
    check_sweep(out, sweep_settings(args.preset, preset, args.extra, args.systems, args.tasks))

    pending = [(job, job_status(out, job)) for job in jobs]
    todo = [(job, status) for job, status in pending if status != "done"]
    print(f"protocol {args.preset} in {out}: {len(jobs)} runs, {len(jobs) - len(todo)} done, "
          f"{sum(s == 'resume' for _, s in todo)} to resume, {sum(s == 'new' for _, s in todo)} new")
    failed = 0
    for count, (job, status) in enumerate(todo[: args.max_runs], 1):
        print(f"[{count}/{len(todo)}] {job.system} on {job.env}/{job.task} ({status}) ...", flush=True)
        code, seconds = run_job(out, job, preset, args.extra, status, args.verbose)
        if code == 0:
            print(f"    done in {seconds:.0f}s: absolute {absolute_of(read_results(out), job)}", flush=True)
        else:
            failed += 1
            print(f"    failed (exit {code}) after {seconds:.0f}s; see {os.path.join(out, 'logs', job.name + '.log')}; "
                  "run the command again to continue", flush=True)
    summary = write_summary(out, jobs, args.preset, preset, args.extra)
    print(f"summary: {summary}")
    if args.report:
        report.main([os.path.join(out, "results.json"), *args.compare, "--out", os.path.join(out, "report")])
        print(f"report: {os.path.join(out, 'report', 'report.md')}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
