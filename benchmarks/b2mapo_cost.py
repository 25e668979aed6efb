"""What B2MAPO costs next to A2PO and MAPPO: update wall-clock per iteration, compile time,
sequential optimiser steps, the number of batches L, and the acting latency of the executed policy.

For each task, every system is built from its Hydra config with the same layout (``--common``:
rollout, epochs, minibatches, envs) and separate parameters (mappo too, so the networks match):

- ``iteration``: the median wall time of one update (rollout + learner) over ``--repeats`` timed
  chunks of ``--updates`` updates, systems timed round robin (as ``sequential_throughput.py``);
- ``rollout``: the system's own rollout alone (compiled on its own), timed in the same round robin
  right after each of the system's chunks (median of ``--repeats``), so machine drift hits both
  alike; ``update`` = iteration − rollout, the learner's share;
- ``compile``: the update chunk's compile (wall and process CPU);
- ``L``: batches (stages) per update over the timed updates (b2mapo's generator learns meanwhile;
  its distribution over whole training runs is in each run's ``schedule.json``); the row
  ``b2mapo blocks (L=2)`` fixes two batches of n/2, the fewest the default cap allows (what the
  generator's batch cost drives towards), so it is the cost of a converged schedule;
- ``b2mapo group_sizes=max``: every batch trained in ``max_batch_size`` slots (how every batch
  ran before the group sizes of 2026-12-03); ``b2mapo without π_ind``: ``derived_policy=false``, so
  π_ind's pass is not run (its cost is the difference to ``b2mapo``);
- sequential optimiser steps per iteration: the actor/critic steps that must run one after the
  other, stages x epochs x minibatches (mappo 1 stage, a2po n, b2mapo L), and b2mapo's extra
  ones (generator epochs + DAG critic + π_ind epochs x minibatches + the KL pass);
- acting latency: one ``System.act`` call (sampling) of what each system executes, at batch 1
  and ``--batch`` envs: mappo/a2po their per-agent actors, b2mapo π_ind (one shared actor), and
  the DAG-conditioned π acting level by level, on the DAG of the last timed update and on a
  chain (L = n, the worst case).

    python benchmarks/b2mapo_cost.py                                  # connector 10 agents, SMAX 10m_vs_11m
    python benchmarks/b2mapo_cost.py --quick --tasks connector:con-10x10x10a

Writes ``benchmarks/results/b2mapo_cost.{json,md}`` atomically.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.sequential_throughput import Case, write_atomic  # noqa: E402

TASKS = ["connector:con-10x10x10a", "smax:10m_vs_11m"]
COMMON = ["system.rollout_length=128", "system.ppo_epochs=4", "system.num_minibatches=2", "arch.num_envs=32",
          "network.parameter_sharing=separate"]
# (row label, system, extra overrides)
SYSTEMS = [("mappo", "mappo", []), ("a2po", "a2po", []), ("b2mapo", "b2mapo", []),
           ("b2mapo group_sizes=max", "b2mapo", ["system.group_sizes=max"]),
           ("b2mapo without π_ind", "b2mapo", ["system.derived_policy=false"]),
           ("b2mapo dag_conditioned", "b2mapo", ["system.joint_policy=dag_conditioned"]),
           ("b2mapo blocks (L=2)", "b2mapo", ["system.partition=blocks", "system.num_blocks=2"])]


def seconds(fn: Callable[[], Any]) -> float:
    """Wall seconds of one ``fn()``, waiting for its results."""
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start


def median_seconds(fn: Callable[[], Any], repeats: int) -> float:
    jax.block_until_ready(fn())  # warm-up
    return statistics.median(seconds(fn) for _ in range(repeats))


def one_seed(case: Case) -> Any:
    """Seed 0's learner state, host copy, without the seed axis (single-device layout)."""
    from systems.anakin import init_learner_states

    return jax.tree.map(lambda x: x[0], jax.device_get(init_learner_states(case.system, case.env, case.settings)))


def collect_fn(case: Case) -> Callable[[Any, jax.Array], Any]:
    """The system's own rollout (``PolicyModel.collect``), as its update runs it."""
    from networks.policy import make_policy_nets
    from systems import b2mapo_anakin
    from systems.policy import policy_model

    settings, spec = case.settings, case.env.spec
    if case.name == "b2mapo":
        parts, _ = b2mapo_anakin.make_parts(settings, spec)
        return b2mapo_anakin.joint_model(parts, case.vec_env).collect
    nets = make_policy_nets(settings.network, spec, settings.system.centralised_critic)
    return policy_model(nets, spec, case.vec_env, settings.system.rollout_length).collect


def rollout_runner(case: Case, state: Any) -> Callable[[], float]:
    """A compiled, warmed-up rollout of ``state``; each call runs it once and returns its seconds."""
    from utils.devices import DEVICE_AXIS

    collect = collect_fn(case)
    # the engine's collect runs inside shard_map; one device: a vmap with the axis name will do
    run = jax.jit(jax.vmap(lambda s, k: collect(s, k).traj.reward, axis_name=DEVICE_AXIS))
    batched = jax.tree.map(lambda x: x[None], state)
    keys = jax.random.split(jax.random.PRNGKey(0), 1)
    jax.block_until_ready(run(batched, keys))  # compile and warm up
    return lambda: seconds(lambda: run(batched, keys))


def acting_latency(env: Any, system: Any, acting_params: Any, batch: int, repeats: int) -> float:
    """Median seconds of one jitted ``System.act`` (sampling) on ``batch`` envs."""
    timestep = jax.vmap(env.reset)(jax.random.split(jax.random.PRNGKey(1), batch))[1]
    hidden = system.init_actor_state(batch)
    act = jax.jit(lambda p, t, k, h: system.act(p, t, k, h, False))
    key = jax.random.PRNGKey(2)
    return median_seconds(lambda: act(acting_params, timestep, key, hidden), repeats)


def conditioned_acting(case: Case, state: Any, dag: Any) -> Any:
    """Executing the DAG-conditioned π: the ``derived_policy=false`` system's act on ``dag``."""
    from systems import b2mapo_anakin

    return b2mapo_anakin.ConditionedActing(state.params.ind, state.params.actor, dag)


def sequential_steps(case: Case, mean_batches: float) -> dict[str, float]:
    cfg, n = case.settings.system, case.num_agents
    per_stage = cfg.ppo_epochs * cfg.num_minibatches
    stages = {"mappo": 1.0, "a2po": float(n), "b2mapo": mean_batches}[case.name]
    extra = 0.0
    if case.name == "b2mapo":
        ind = cfg.ind_epochs * cfg.ind_minibatches  # π_ind's pass (MAPPO + KL)
        extra = (cfg.gen_epochs + 1 if cfg.partition == "dag" else 0) + ind
    return dict(stages=stages, stage_steps=stages * per_stage, extra_steps=extra, total_steps=stages * per_stage + extra)


def measure_task(family: str, task: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    cases, labels = [], []
    for label, name, extra in SYSTEMS:
        case = Case(name, family, task, None, args.updates, list(args.common) + extra)
        print(f"{family} {task} {label}: compiled in {case.compile_s:.1f}s ({case.compile_cpu_s:.1f}s CPU)", flush=True)
        cases.append(case)
        labels.append(label)
    states = [one_seed(case) for case in cases]
    rollouts = [rollout_runner(case, state) for case, state in zip(cases, states)]
    batches: dict[str, list[float]] = {label: [] for label in labels}
    rollout_times: dict[str, list[float]] = {label: [] for label in labels}
    for _ in range(args.repeats):  # round robin: each system's chunk, then its rollout alone
        for case, label, rollout in zip(cases, labels, rollouts):
            wall, cpu = case.call()
            case.times.append(wall)
            case.cpu_times.append(cpu)
            rollout_times[label].append(rollout())
            if "num_batches" in case.metrics:
                batches[label] += np.asarray(case.metrics["num_batches"]).ravel().tolist()
    rows = []
    for case, label, state in zip(cases, labels, states):
        iteration = statistics.median(case.times) / args.updates
        rollout = statistics.median(rollout_times[label])
        ls = batches[label] or [1.0 if case.name == "mappo" else float(case.num_agents)]
        row = dict(env=family, task=task, system=label, num_agents=case.num_agents,
                   iteration_ms=1e3 * iteration, rollout_ms=1e3 * rollout, update_ms=1e3 * (iteration - rollout),
                   iteration_ms_all=[1e3 * t / args.updates for t in case.times],
                   rollout_ms_all=[1e3 * t for t in rollout_times[label]],
                   compile_s=case.compile_s, compile_cpu_s=case.compile_cpu_s,
                   batches_mean=float(np.mean(ls)), batches_hist={str(int(k)): int(v) for k, v in
                                                                 zip(*np.unique(np.asarray(ls), return_counts=True))},
                   **sequential_steps(case, float(np.mean(ls))),
                   rollout_length=case.settings.system.rollout_length, num_envs=case.settings.arch.num_envs,
                   ppo_epochs=case.settings.system.ppo_epochs, num_minibatches=case.settings.system.num_minibatches,
                   load_average=os.getloadavg()[0])
        executed = case.system.eval_params(jax.tree.map(jnp.asarray, state))
        for batch in (1, args.batch):
            row[f"act_ms_b{batch}"] = 1e3 * acting_latency(case.env, case.system, executed, batch, args.act_repeats)
        if label == "b2mapo dag_conditioned":
            from networks.conditioned import ActingDag
            from networks.dag import levels, num_levels
            from systems import b2mapo_anakin

            settings = case.settings  # the derived_policy=false system: its act runs π level by level
            executing = b2mapo_anakin.build(dataclasses.replace(settings, system=dataclasses.replace(
                settings.system, derived_policy=False)), case.env.spec, case.vec_env)
            last = jax.tree.map(lambda x: np.asarray(x)[0], jax.device_get(case.state.extras.dag))
            n = case.num_agents
            chain = np.eye(n, k=1, dtype=bool)
            chain_level = levels(jnp.asarray(chain))
            dags = {"last": ActingDag(*map(jnp.asarray, last)),
                    "chain": ActingDag(jnp.asarray(chain), chain_level, num_levels(chain_level))}
            for name, dag in dags.items():
                params = conditioned_acting(case, state, dag)
                row[f"levels_{name}"] = int(dag.num_levels)
                for batch in (1, args.batch):
                    row[f"act_pi_{name}_ms_b{batch}"] = 1e3 * acting_latency(case.env, executing, params, batch,
                                                                             args.act_repeats)
        rows.append(row)
        print(f"{task} {label}: iteration {row['iteration_ms']:.0f} ms, rollout {row['rollout_ms']:.0f} ms, "
              f"update {row['update_ms']:.0f} ms, L {row['batches_mean']:.2f}, act b1 {row['act_ms_b1']:.3f} ms",
              flush=True)
    return rows


def markdown(rows: list[dict[str, Any]], batch: int) -> str:
    lines = ["| task | system | iteration ms | rollout ms | update ms | update vs a2po | compile s (CPU s) | "
             "L: mean (histogram) | sequential optimiser steps: stages x E x M (+ extra) |",
             "|---|---|---:|---:|---:|---:|---|---|---|"]
    for row in rows:
        ref = next((r for r in rows if r["task"] == row["task"] and r["system"] == "a2po"), None)
        rel = "—" if ref is None else f"{row['update_ms'] / ref['update_ms']:.2f}×"
        hist = ", ".join(f"{k}: {v}" for k, v in row["batches_hist"].items())
        extra = f" (+{row['extra_steps']:.0f})" if row["extra_steps"] else ""
        lines.append(f"| {row['env']} {row['task']} | {row['system']} | {row['iteration_ms']:.0f} | "
                     f"{row['rollout_ms']:.0f} | {row['update_ms']:.0f} | {rel} | {row['compile_s']:.1f} "
                     f"({row['compile_cpu_s']:.1f}) | {row['batches_mean']:.2f} ({hist}) | "
                     f"{row['stage_steps']:.0f}{extra} |")
    lines += ["", f"Acting latency, one `System.act` call (sampling), ms at batch 1 / {batch} envs:", "",
              "| task | executed policy | batch 1 | batch " + str(batch) + " |", "|---|---|---:|---:|"]
    executed = {"mappo": "mappo: per-agent actors", "a2po": "a2po: per-agent actors",
                "b2mapo": "b2mapo: π_ind (shared actor)", "b2mapo dag_conditioned": "b2mapo dag_conditioned: π_ind",
                "b2mapo blocks (L=2)": "b2mapo blocks: π_ind", "b2mapo group_sizes=max": "b2mapo group_sizes=max: π_ind",
                "b2mapo without π_ind": "b2mapo without π_ind: π (per-agent actors)"}
    for row in rows:
        lines.append(f"| {row['env']} {row['task']} | {executed[row['system']]} | {row['act_ms_b1']:.3f} | "
                     f"{row[f'act_ms_b{batch}']:.3f} |")
        for name in ("last", "chain"):
            if f"act_pi_{name}_ms_b1" in row:
                lines.append(f"| {row['env']} {row['task']} | DAG-conditioned π, {name} DAG ({row[f'levels_{name}']} "
                             f"levels) | {row[f'act_pi_{name}_ms_b1']:.3f} | {row[f'act_pi_{name}_ms_b{batch}']:.3f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=TASKS, help="env:task pairs")
    parser.add_argument("--updates", type=int, default=None, help="updates per timed chunk (default 4)")
    parser.add_argument("--repeats", type=int, default=None, help="timed chunks per system (default 5)")
    parser.add_argument("--act-repeats", type=int, default=100, help="timed act calls")
    parser.add_argument("--batch", type=int, default=1024, help="the large acting batch")
    parser.add_argument("--common", nargs="*", default=COMMON, help="overrides applied to every system")
    parser.add_argument("--quick", action="store_true", help="2 updates per chunk, 3 repeats, 20 act calls")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    args.updates = args.updates or (2 if args.quick else 4)
    args.repeats = args.repeats or (3 if args.quick else 5)
    if args.quick:
        args.act_repeats = min(args.act_repeats, 20)
    meta = dict(jax=jax.__version__, platform=jax.devices()[0].platform, cpu_count=os.cpu_count(),
                python=platform.python_version(), time=time.strftime("%Y-%m-%dT%H:%M:%S"),
                command="python " + " ".join(sys.argv), common=list(args.common))
    rows: list[dict[str, Any]] = []
    for pair in args.tasks:
        family, task = pair.split(":", 1)
        rows += measure_task(family, task, args)
    write_atomic(args.out / "b2mapo_cost.json", json.dumps(dict(meta=meta, rows=rows), indent=2))
    header = (f"B2MAPO's cost next to A2PO and MAPPO (update = iteration − the system's own rollout; medians of "
              f"{args.repeats} chunks of {args.updates} updates, systems timed round robin); jax {jax.__version__} "
              f"on {jax.devices()[0].platform} ({os.cpu_count()} CPU cores, one XLA device). Same layout for every "
              f"system: {' '.join(args.common)}. Command: `{meta['command']}`.\n\n")
    text = header + markdown(rows, args.batch)
    write_atomic(args.out / "b2mapo_cost.md", text)
    print("\n" + text)


if __name__ == "__main__":
    main()
