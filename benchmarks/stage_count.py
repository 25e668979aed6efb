"""Cost of unused stages: an update whose schedule uses L = 1 of 10 possible stages against the
one-stage plan, and the 10 singleton stages of an agent-by-agent plan for scale.

Plans (10 agents, connector con-10x10x10a, CoPPO's config with a2po_coppo surrogate and PreOPC,
separate parameters, Mava's layout: 32 envs x 128 steps, 4 epochs x 2 minibatches, one device):
- ``one-stage``: ``simultaneous(10)`` (no stage loop);
- ``L=1 of 10``: every agent in stage 0, ``num_stages=10`` (the while-loop runs once);
- ``L=10 singletons``: one agent per stage, capacity 1 (what A2PO runs).
Each is compiled once, warmed up, then timed round robin; medians of ``--repeats`` chunks.

    python benchmarks/stage_count.py

Writes ``benchmarks/results/stage_count.md``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks.sequential_throughput import compose, write_atomic  # noqa: E402
from envs.vector import AutoResetVecEnv  # noqa: E402
from systems.anakin import init_learner_states, make_envs, make_update_chunk, shard_state  # noqa: E402
from systems.settings import load_settings  # noqa: E402
from systems.stages import Plan, Schedule, StageConfig, keyed, make_stage_system, simultaneous  # noqa: E402
from utils.devices import make_mesh  # noqa: E402

N = 10


def all_in_first(max_stages: int) -> Plan:
    def schedule(key, score):
        return Schedule(jnp.zeros(N, jnp.int32), jnp.full(N, N, jnp.int32), jnp.ones((), jnp.int32))

    return Plan(keyed(schedule), num_stages=max_stages)


def singletons() -> Plan:
    def schedule(key, score):
        stage = jnp.arange(N, dtype=jnp.int32)
        return Schedule(stage, stage + 1, jnp.asarray(N, jnp.int32))

    return Plan(keyed(schedule), num_stages=N, capacity=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--updates", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    overrides = ["env=connector", "env.task=con-10x10x10a", "arch.num_envs=32", "arch.num_devices=1",
                 "arch.num_evaluation=1", f"arch.total_timesteps={32 * 128 * args.updates}", "system.ppo_epochs=4",
                 "system.num_minibatches=2", "system.surrogate=a2po_coppo", "system.advantage=preopc",
                 "network.parameter_sharing=separate", "logger.progress=false"]
    settings = load_settings(compose("coppo", overrides), StageConfig)
    mesh = make_mesh(1)
    env, _ = make_envs(settings)
    vec = AutoResetVecEnv(env, settings.envs_per_device, settings.arch.num_resets)
    plans = {"one-stage": simultaneous(N), "L=1 of 10": all_in_first(N), "L=10 singletons": singletons()}
    cases = {}
    for name, plan in plans.items():
        system = make_stage_system(settings, env.spec, vec, plan)
        state = shard_state(init_learner_states(system, env, settings), mesh, system.env_fields)
        start = time.perf_counter()
        compiled = make_update_chunk(system, settings, mesh, state).lower(state).compile()
        compile_s = time.perf_counter() - start
        state = jax.block_until_ready(compiled(state))[0]
        cases[name] = dict(compiled=compiled, state=state, times=[], compile_s=compile_s)
    for _ in range(args.repeats):
        for case in cases.values():
            start = time.perf_counter()
            case["state"] = jax.block_until_ready(case["compiled"](case["state"]))[0]
            case["times"].append(time.perf_counter() - start)
    base = statistics.median(cases["one-stage"]["times"])
    lines = [f"Update time by stage plan, connector con-10x10x10a (10 agents), separate parameters, "
             f"{args.updates} updates per chunk, median of {args.repeats}, one CPU device.", "",
             "| plan | s per update | vs one-stage | compile s |", "|---|---:|---:|---:|"]
    for name, case in cases.items():
        seconds = statistics.median(case["times"])
        lines.append(f"| {name} | {seconds / args.updates:.3f} | {seconds / base:.2f}x | {case['compile_s']:.1f} |")
    text = "\n".join(lines) + f"\n\nCommand: `python benchmarks/stage_count.py --updates {args.updates} " \
                              f"--repeats {args.repeats}` (load average {os.getloadavg()[0]:.1f}).\n"
    print(text)
    write_atomic(Path(__file__).parent / "results" / "stage_count.md", text)


if __name__ == "__main__":
    main()
