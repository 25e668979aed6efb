"""Training throughput and compile time of the sequential family: mappo, coppo, happo, a2po.

For each task and system: build the real system from its Hydra config, compile one update chunk
(``--updates`` updates per chunk, learning included, no evaluation): compile seconds, wall and
process CPU (``lower().compile()``); then, after one warm-up call each, the systems of a task are
timed round robin (so load changes hit all alike) and each reports the median of ``--repeats``.
Steps/s counts joint env steps (rollout_length x num_envs per update). Every system uses the same
rollout / epochs / minibatches / envs (``--common``, Mava's MAPPO layout by default) so the update
scheme is the only difference; each keeps its own parameter-sharing default (shared for mappo,
coppo, happo and a2po since issue 14) unless ``--sharing`` or ``name:shared``/``name:separate`` says otherwise.

    python benchmarks/sequential_throughput.py                     # lbf 2 agents, connector 10 agents
    python benchmarks/sequential_throughput.py --quick --tasks connector:con-10x10x10a

Writes ``benchmarks/results/sequential_throughput.{json,md}`` (atomically; rows of earlier runs
with other (task, system, sharing) keys are kept, so runs can be split).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402

TASKS = ["lbf:8x8-2p-2f-coop", "connector:con-10x10x10a"]
SYSTEMS = ["mappo", "coppo", "happo", "a2po", "mappo:separate", "a2po:shared"]
COMMON = ["system.rollout_length=128", "system.ppo_epochs=4", "system.num_minibatches=2", "arch.num_envs=32"]


def system_of(name: str) -> tuple[type, Any]:
    """(config class, builder) of a system by name."""
    module = __import__(f"systems.{name}_anakin", fromlist=["build"])
    return module.CONFIG, module.build


def compose(name: str, overrides: list[str]) -> Any:
    from hydra import compose as hydra_compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        return hydra_compose(config_name=name, overrides=overrides)


class Case:
    """One (task, system, sharing): its compiled update chunk, its state and its timings."""

    def __init__(self, system_name: str, family: str, task: str, sharing: str | None, updates: int,
                 common: list[str], warm_up: bool = True, compiles: int = 1):
        from envs.vector import AutoResetVecEnv
        from systems.anakin import init_learner_states, make_envs, make_update_chunk, shard_state
        from systems.settings import load_settings
        from utils.devices import make_mesh

        cls, build = system_of(system_name)
        overrides = [f"env={family}", f"env.task={task}", "logger.progress=false", "logger.plot=false"] + common
        if sharing:
            overrides.append(f"network.parameter_sharing={sharing}")
        probe = load_settings(compose(system_name, overrides + ["arch.num_evaluation=1", "arch.total_timesteps=1e9"]), cls)
        overrides += ["arch.num_evaluation=1", f"arch.total_timesteps={probe.steps_per_update * updates}"]
        self.settings = settings = load_settings(compose(system_name, overrides), cls)
        assert settings.num_updates_per_eval == updates
        self.name, self.family, self.task = system_name, family, task
        env, _ = make_envs(settings)
        self.num_agents = env.spec.num_agents
        mesh = make_mesh(settings.num_devices)
        self.env, self.vec_env = env, AutoResetVecEnv(env, settings.envs_per_device, settings.arch.num_resets)
        self.system = system = build(settings, env.spec, self.vec_env)
        self.state = shard_state(init_learner_states(system, env, settings), mesh, system.env_fields)
        chunk = make_update_chunk(system, settings, mesh, self.state)
        walls, cpus = [], []
        for _ in range(compiles):  # the fastest of ``compiles`` (load only ever slows a compile down)
            jax.clear_caches()  # a real compile every time, not an in-memory cache hit
            wall, cpu = time.perf_counter(), time.process_time()
            self.compiled = chunk.lower(self.state).compile()
            walls.append(time.perf_counter() - wall)
            cpus.append(time.process_time() - cpu)
        self.compile_s, self.compile_cpu_s = min(walls), min(cpus)
        self.times: list[float] = []
        self.cpu_times: list[float] = []
        if warm_up:
            self.call()

    def call(self) -> tuple[float, float]:
        """(wall, process CPU) seconds of one chunk."""
        start, cpu = time.perf_counter(), time.process_time()
        self.state, metrics = self.compiled(self.state)
        jax.block_until_ready((self.state, metrics))
        self.metrics = metrics  # the last chunk's (U, S) training metrics
        return time.perf_counter() - start, time.process_time() - cpu

    def row(self) -> dict[str, Any]:
        settings = self.settings
        if not self.times:  # --compile-only
            return dict(env=self.family, task=self.task, system=self.name, num_agents=self.num_agents,
                        sharing=settings.network.parameter_sharing, compile_s=self.compile_s,
                        compile_cpu_s=self.compile_cpu_s, load_average=os.getloadavg()[0])
        seconds = statistics.median(self.times)
        steps = settings.steps_per_chunk
        return dict(
            env=self.family, task=self.task, system=self.name, num_agents=self.num_agents,
            sharing=settings.network.parameter_sharing, compile_s=self.compile_s,
            compile_cpu_s=self.compile_cpu_s, seconds_per_chunk=seconds, seconds_all=self.times,
            cpu_seconds_all=self.cpu_times, steps_per_chunk=steps, steps_per_s=steps / seconds,
            us_per_step=1e6 * seconds / steps, min_us_per_step=1e6 * min(self.times) / steps,
            cpu_us_per_step=1e6 * statistics.median(self.cpu_times) / steps,
            updates_per_chunk=settings.num_updates_per_eval, repeats=len(self.times),
            rollout_length=settings.system.rollout_length, num_envs=settings.arch.num_envs,
            ppo_epochs=settings.system.ppo_epochs, num_minibatches=settings.system.num_minibatches,
            devices=settings.num_devices, load_average=os.getloadavg()[0],
        )


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.replace(tmp, path)


def markdown(rows: list[dict[str, Any]]) -> str:
    """Ratios are time per env step over mappo's on the same task: wall median / wall min / CPU."""
    lines = ["| task | agents | system | params | steps/s | µs/step (median, min, CPU) | "
             "vs mappo, same params | vs mappo shared | compile s (CPU s) |",
             "|---|---:|---|---|---:|---|---|---|---|"]
    keys = ("us_per_step", "min_us_per_step", "cpu_us_per_step")

    def ratio(row: dict[str, Any], sharing: str) -> str:
        for ref in rows:
            if (ref["task"], ref["system"], ref["sharing"]) == (row["task"], "mappo", sharing):
                return " / ".join(f"{row[k] / ref[k]:.2f}×" if k in row and k in ref else "—" for k in keys)
        return "—"

    for row in rows:
        times = ", ".join(f"{row[k]:.0f}" if k in row else "—" for k in keys)
        lines.append(f"| {row['env']} {row['task']} | {row['num_agents']} | {row['system']} | {row['sharing']} | "
                     f"{row['steps_per_s']:,.0f} | {times} | {ratio(row, row['sharing'])} | {ratio(row, 'shared')} | "
                     f"{row['compile_s']:.1f} ({row.get('compile_cpu_s', float('nan')):.1f}) |")
    return "\n".join(lines) + "\n"


def compile_markdown(rows: list[dict[str, Any]]) -> str:
    """Compile seconds per (task, system), and each system's cost relative to mappo on the same task."""
    lines = ["| task | agents | system | params | compile s | CPU s | CPU vs mappo (same params) |",
             "|---|---:|---|---|---:|---:|---:|"]
    for row in rows:
        ref = next((r for r in rows if (r["task"], r["system"], r["sharing"]) == (row["task"], "mappo", row["sharing"])), None)
        rel = "—" if ref is None else f"{row['compile_cpu_s'] / ref['compile_cpu_s']:.2f}×"
        lines.append(f"| {row['env']} {row['task']} | {row['num_agents']} | {row['system']} | {row['sharing']} | "
                     f"{row['compile_s']:.1f} | {row['compile_cpu_s']:.1f} | {rel} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=TASKS, help="env:task pairs")
    parser.add_argument("--systems", nargs="+", default=SYSTEMS,
                        help="system names, optionally name:shared or name:separate")
    parser.add_argument("--sharing", choices=["shared", "separate"], nargs="*", default=[None],
                        help="parameter sharing (default: each system's own); several: one row each")
    parser.add_argument("--updates", type=int, default=None, help="updates per timed chunk (default 4)")
    parser.add_argument("--repeats", type=int, default=None, help="timed chunk calls (default 5)")
    parser.add_argument("--common", nargs="*", default=COMMON, help="overrides applied to every system")
    parser.add_argument("--quick", action="store_true", help="2 updates per chunk, 3 repeats")
    parser.add_argument("--compile-only", action="store_true",
                        help="only compile times, the fastest of --repeats compiles (to sequential_compile.{json,md})")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    updates = args.updates or (2 if args.quick else 4)
    repeats = args.repeats or (3 if args.quick else 5)

    stem = "sequential_compile" if args.compile_only else "sequential_throughput"
    json_path = args.out / f"{stem}.json"
    rows: list[dict[str, Any]] = []
    if json_path.exists():
        rows = json.loads(json_path.read_text()).get("rows", [])
    meta = dict(jax=jax.__version__, platform=jax.devices()[0].platform, cpu_count=os.cpu_count(),
                python=platform.python_version(), time=time.strftime("%Y-%m-%dT%H:%M:%S"),
                command="python " + " ".join(sys.argv), common=list(args.common))
    for pair in args.tasks:
        family, task = pair.split(":", 1)
        cases = []
        for sharing in args.sharing or [None]:
            for spec in args.systems:
                name, _, own = spec.partition(":")
                case = Case(name, family, task, own or sharing, updates, list(args.common), not args.compile_only,
                            repeats if args.compile_only else 1)
                print(f"{family} {task} {name} {case.settings.network.parameter_sharing}: compiled in "
                      f"{case.compile_s:.1f}s ({case.compile_cpu_s:.1f}s CPU)", flush=True)
                cases.append(case)
        for _ in range(0 if args.compile_only else repeats):  # round robin: load changes hit all alike
            for case in cases:
                wall, cpu = case.call()
                case.times.append(wall)
                case.cpu_times.append(cpu)
        for case in cases:
            row = case.row()
            key = (row["task"], row["system"], row["sharing"])
            rows = [r for r in rows if (r["task"], r["system"], r["sharing"]) != key] + [row]
            if "steps_per_s" in row:
                print(f"{family:9s} {task:18s} {row['system']:6s} {row['sharing']:8s} {row['steps_per_s']:10,.0f} "
                      f"steps/s {row['us_per_step']:8.2f} us/step (CPU {row['cpu_us_per_step']:.2f})", flush=True)
        del cases
        write_atomic(json_path, json.dumps(dict(meta=meta, rows=rows), indent=2))
        header = (f"Training throughput (joint env steps/s, learning included, compile excluded; median of "
                  f"{repeats} timed chunks of {updates} updates, systems timed round robin) and compile time; "
                  f"jax {jax.__version__} on {jax.devices()[0].platform} ({os.cpu_count()} CPU cores). "
                  f"Same layout for every system: {' '.join(args.common)}. Last command: `{meta['command']}`.\n\n")
        if args.compile_only:
            header = (f"Compile time of one update chunk (wall s, process CPU s); jax {jax.__version__} on "
                      f"{jax.devices()[0].platform} ({os.cpu_count()} CPU cores). Last command: `{meta['command']}`.\n\n")
        write_atomic(args.out / f"{stem}.md", header + (compile_markdown(rows) if args.compile_only else markdown(rows)))
    print("\n" + (compile_markdown(rows) if args.compile_only else markdown(rows)))


if __name__ == "__main__":
    main()
