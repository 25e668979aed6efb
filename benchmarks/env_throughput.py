"""Env-only throughput (steps/s) of the Jumanji adapters under three auto-reset schemes.

  ours     envs.vector.AutoResetVecEnv (reset pool of ceil(E / 16) fresh starts per step)
  cond     the same adapter, per env ``lax.cond(last, reset, identity)`` under ``vmap`` (what
           Jumanji's and Mava's AutoResetWrapper do: under vmap every env pays a reset every step)
  jumanji  the raw Jumanji env in ``jumanji.wrappers.VmapAutoResetWrapper`` (no adapter at all)

Random legal actions, a jit'ed ``lax.scan`` of ``--steps`` steps, compile excluded, median over
``--repeats`` timed calls. Steps/s counts env steps (one per env per scan step). For each (task,
batch size) the methods' timed calls are interleaved (ours, cond, jumanji, ours, ...), so that a
changing background load hits them alike.

    python benchmarks/env_throughput.py [--quick]

Writes ``benchmarks/results/env_throughput.{json,md}``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import Array

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import envs  # noqa: E402
from envs.vector import AutoResetVecEnv  # noqa: E402

CASES = [("rware", "tiny-2ag"), ("lbf", "8x8-2p-2f-coop"), ("connector", "con-5x5x3a")]
METHODS = ("ours", "cond", "jumanji")


def random_legal(key: Array, action_mask: Array) -> Array:
    """(..., A) int32 actions drawn uniformly from the legal ones of ``action_mask`` (..., A, n)."""
    logits = jnp.where(action_mask, 0.0, -jnp.inf)
    return jax.random.categorical(key, logits).astype(jnp.int32)


def rollout_ours(env: envs.MarlEnv, num_envs: int, steps: int) -> tuple[Callable, Any]:
    vec = AutoResetVecEnv(env, num_envs)

    def run(carry: Any) -> Any:
        def body(carry: Any, _: None) -> tuple[Any, None]:
            state, mask, key = carry
            key, k_act, k_reset = jax.random.split(key, 3)
            state, ts, _ = vec.step(state, random_legal(k_act, mask), k_reset)
            return (state, ts.observation.action_mask, key), None

        return jax.lax.scan(body, carry, None, length=steps)[0]

    state, ts = jax.jit(vec.reset)(jax.random.PRNGKey(0))
    return jax.jit(run), (state, ts.observation.action_mask, jax.random.PRNGKey(1))


def rollout_cond(env: envs.MarlEnv, num_envs: int, steps: int) -> tuple[Callable, Any]:
    def step_or_reset(state: Any, action: Array, key: Array) -> tuple[Any, Any]:
        state, ts = env.step(state, action)

        def restart(_: None) -> tuple[Any, Any]:
            fresh, fresh_ts = env.reset(key)
            return fresh, ts._replace(observation=fresh_ts.observation)

        return jax.lax.cond(ts.last(), restart, lambda _: (state, ts), None)

    def run(carry: Any) -> Any:
        def body(carry: Any, _: None) -> tuple[Any, None]:
            state, mask, key = carry
            key, k_act, k_reset = jax.random.split(key, 3)
            keys = jax.random.split(k_reset, num_envs)
            state, ts = jax.vmap(step_or_reset)(state, random_legal(k_act, mask), keys)
            return (state, ts.observation.action_mask, key), None

        return jax.lax.scan(body, carry, None, length=steps)[0]

    keys = jax.random.split(jax.random.PRNGKey(0), num_envs)
    state, ts = jax.jit(jax.vmap(env.reset))(keys)
    return jax.jit(run), (state, ts.observation.action_mask, jax.random.PRNGKey(1))


def rollout_jumanji(family: str, task: str, num_envs: int, steps: int) -> tuple[Callable, Any]:
    from jumanji.wrappers import VmapAutoResetWrapper

    raw = importlib.import_module(envs.FAMILIES[family][0]).jumanji_env(task)
    vec = VmapAutoResetWrapper(raw)

    def run(carry: Any) -> Any:
        def body(carry: Any, _: None) -> tuple[Any, None]:
            state, mask, key = carry
            key, k_act = jax.random.split(key)
            state, ts = vec.step(state, random_legal(k_act, mask))
            return (state, ts.observation.action_mask, key), None

        return jax.lax.scan(body, carry, None, length=steps)[0]

    state, ts = jax.jit(vec.reset)(jax.random.split(jax.random.PRNGKey(0), num_envs))
    return jax.jit(run), (state, ts.observation.action_mask, jax.random.PRNGKey(1))


def build(
    method: str, family: str, task: str, env: envs.MarlEnv, num_envs: int, steps: int
) -> tuple[Callable, Any]:
    """(jit'ed rollout, initial carry) of one method."""
    if method == "ours":
        return rollout_ours(env, num_envs, steps)
    if method == "cond":
        return rollout_cond(env, num_envs, steps)
    return rollout_jumanji(family, task, num_envs, steps)


def timed(run: Callable, carry: Any) -> tuple[float, Any]:
    """(seconds, new carry) of one blocking call."""
    start = time.perf_counter()
    carry = jax.block_until_ready(run(carry))
    return time.perf_counter() - start, carry


def measure_interleaved(
    rollouts: dict[str, tuple[Callable, Any]], repeats: int
) -> dict[str, tuple[float, float]]:
    """method -> (compile + first call seconds, median seconds per call), calls interleaved."""
    carries, first, times = {}, {}, {name: [] for name in rollouts}
    for name, (run, carry) in rollouts.items():
        first[name], carries[name] = timed(run, carry)
    for _ in range(repeats):
        for name, (run, _) in rollouts.items():
            seconds, carries[name] = timed(run, carries[name])
            times[name].append(seconds)
    return {name: (first[name], statistics.median(times[name])) for name in rollouts}


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.chmod(tmp, 0o644)  # mkstemp makes it private
    os.replace(tmp, path)


def markdown(rows: list[dict[str, Any]], sizes: list[int]) -> str:
    def cell(family: str, task: str, size: int, method: str) -> float | None:
        for row in rows:
            if (row["env"], row["task"], row["num_envs"], row["method"]) == (
                family,
                task,
                size,
                method,
            ):
                return row["steps_per_s"]
        return None

    lines = [
        "| env / task | envs | ours (reset pool) | cond (vmap'd lax.cond) | jumanji wrapper "
        "| ours / cond | ours / jumanji |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for family, task in CASES:
        for size in sizes:
            got = {m: cell(family, task, size, m) for m in METHODS}

            def fmt(x: float | None) -> str:
                return "—" if x is None else f"{x / 1e3:,.0f}k"

            def ratio(a: float | None, b: float | None) -> str:
                return "—" if a is None or b is None else f"{a / b:.2f}×"

            lines.append(
                f"| {family} {task} | {size} | {fmt(got['ours'])} | {fmt(got['cond'])} | "
                f"{fmt(got['jumanji'])} | {ratio(got['ours'], got['cond'])} | "
                f"{ratio(got['ours'], got['jumanji'])} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats and steps")
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 512, 1024])
    parser.add_argument("--steps", type=int, default=None, help="scan length (default 100)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls (default 9)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    steps = args.steps or (64 if args.quick else 100)
    repeats = args.repeats or (3 if args.quick else 9)

    load_at_start = os.getloadavg()
    rows: list[dict[str, Any]] = []
    for family, task in CASES:
        env = envs.make(family, task)
        for size in args.sizes:
            rollouts = {m: build(m, family, task, env, size, steps) for m in args.methods}
            for method, (first, seconds) in measure_interleaved(rollouts, repeats).items():
                rate = size * steps / seconds
                rows.append(
                    dict(
                        env=family,
                        task=task,
                        num_envs=size,
                        method=method,
                        steps_per_s=rate,
                        seconds_per_call=seconds,
                        compile_and_first_call_s=first,
                        scan_steps=steps,
                        repeats=repeats,
                    )
                )
                print(
                    f"{family:9s} {task:16s} E={size:5d} {method:8s} {rate / 1e3:9.1f}k steps/s"
                    f"  (first call {first:.1f}s)",
                    flush=True,
                )

    table = markdown(rows, args.sizes)
    load = os.getloadavg()
    header = (
        f"Env-only throughput (env steps/s, random legal actions, scan of {steps} steps, "
        f"median of {repeats}); jax {jax.__version__} on {jax.devices()[0].platform} "
        f"({os.cpu_count()} CPU cores; 1-min load average {load_at_start[0]:.1f} at the start, "
        f"{load[0]:.1f} at the end: other jobs shared the CPU); `ours` uses a reset pool of "
        f"ceil(E/16).\n\n"
    )
    print("\n" + table)
    meta = dict(
        jax=jax.__version__,
        platform=jax.devices()[0].platform,
        device=str(jax.devices()[0]),
        cpu_count=os.cpu_count(),
        python=platform.python_version(),
        scan_steps=steps,
        repeats=repeats,
        quick=args.quick,
        load_average_at_start=load_at_start,
        load_average_at_end=load,
        time=time.strftime("%Y-%m-%dT%H:%M:%S"),
    )
    write_atomic(args.out / "env_throughput.json", json.dumps(dict(meta=meta, rows=rows), indent=2))
    write_atomic(args.out / "env_throughput.md", header + table)


if __name__ == "__main__":
    main()
