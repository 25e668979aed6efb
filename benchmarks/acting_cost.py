"""Cost of autoregressive acting (MAT, Sable: one decoder pass per agent, a ``lax.scan`` over agents)
against MAPPO's decentralised actor (all agents in one batched MLP pass), per env step, at 2, 5 and
10 agents.

Policy only, no env: each timed call is a compiled ``lax.scan`` of ``--steps`` acting steps over a
batch of ``--envs`` envs on random observations (30 features, 5 discrete actions, random legal
masks), sampling actions as in a rollout; Sable carries and decays its memory. Networks: mappo's
actor MLP 128x128 (Mava's ff_mappo), MAT and Sable at Mava's defaults (embed 64, 1 block, 1 head).
One device. Medians over ``--repeats`` calls after a warm-up; compile time reported separately.

    python benchmarks/acting_cost.py                      # writes results/acting_cost.{json,md}
    python benchmarks/acting_cost.py --agents 2 5 10 20 --envs 256
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from envs.types import EnvSpec, Observation  # noqa: E402
from networks import make_actor_critic, make_distribution  # noqa: E402
from networks.mat import make_mat  # noqa: E402
from networks.sable import make_sable  # noqa: E402
from utils.logging import atomic_write_text  # noqa: E402

OBS, ACTIONS = 30, 5


def observation(key: jax.Array, envs: int, agents: int) -> Observation:
    k1, k2 = jax.random.split(key)
    mask = jax.random.bernoulli(k2, 0.7, (envs, agents, ACTIONS)).at[..., 0].set(True)
    return Observation(jax.random.normal(k1, (envs, agents, OBS)), mask, jnp.zeros((envs, agents), jnp.int32))


def mappo_actor(spec: EnvSpec):
    nets = make_actor_critic(spec, actor_layers=(128, 128), critic_layers=(128, 128), centralised_critic=False)

    def act(params, hidden, obs, reset, key):
        action = make_distribution(spec, nets.actor(params, obs)).sample(seed=key)
        return hidden, action

    return nets.init_actor(jax.random.key(0)), None, act


def joint_actor(nets):
    def act(params, hidden, obs, reset, key):
        hidden, action, _, _ = nets.act(params, hidden, obs, reset, key, False)
        return hidden, action

    return act


def acting_loop(act, params, hidden, obs, steps: int):
    def body(carry, key):
        hidden, total = carry
        reset = jnp.zeros(obs.action_mask.shape[:1], bool)
        hidden, action = act(params, hidden, obs._replace(step_count=obs.step_count + total), reset, key)
        return (hidden, total + jnp.sum(action)), None

    def run(key):
        (hidden_out, total), _ = jax.lax.scan(body, (hidden, jnp.zeros((), jnp.int32)), jax.random.split(key, steps))
        return total, hidden_out

    return jax.jit(run)


def measure(name: str, agents: int, envs: int, steps: int, repeats: int) -> dict:
    spec = EnvSpec(num_agents=agents, obs_shape=(OBS,), action_kind="discrete", num_actions=ACTIONS, time_limit=500)
    if name == "mappo":
        params, hidden, act = mappo_actor(spec)
    else:
        nets = make_mat(spec, 64, 1, 1) if name == "mat" else make_sable(spec, 64, 1, 1)
        params, hidden, act = nets.init(jax.random.key(0)), nets.init_hidden((envs,)), joint_actor(nets)
    run = acting_loop(act, params, hidden, observation(jax.random.key(1), envs, agents), steps)
    start = time.perf_counter()
    compiled = run.lower(jax.random.key(2)).compile()
    compile_s = time.perf_counter() - start
    jax.block_until_ready(compiled(jax.random.key(3)))
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(jax.random.key(4 + i)))
        times.append(time.perf_counter() - start)
    per_step = statistics.median(times) / steps
    return {"system": name, "agents": agents, "envs": envs, "us_per_batch_step": per_step * 1e6,
            "env_steps_per_second": envs / per_step, "compile_seconds": compile_s}


def markdown(rows: list[dict]) -> str:
    lines = ["| agents | envs | system | acting µs per batch step | acting env steps/s | / mappo's cost | compile (s) |",
             "|---:|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        base = next(b for b in rows if b["system"] == "mappo" and b["agents"] == r["agents"] and b["envs"] == r["envs"])
        lines.append(f"| {r['agents']} | {r['envs']} | {r['system']} | {r['us_per_batch_step']:,.0f} | "
                     f"{r['env_steps_per_second']:,.0f} | {r['us_per_batch_step'] / base['us_per_batch_step']:.1f}x | "
                     f"{r['compile_seconds']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--agents", type=int, nargs="*", default=[2, 5, 10])
    parser.add_argument("--envs", type=int, default=128)
    parser.add_argument("--steps", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args()
    rows = []
    for agents in args.agents:
        for name in ("mappo", "mat", "sable"):
            rows.append(measure(name, agents, args.envs, args.steps, args.repeats))
            print(rows[-1], flush=True)
    command = " ".join(["python benchmarks/acting_cost.py", *sys.argv[1:]])
    meta = {"command": command, "jax": jax.__version__, "backend": jax.default_backend(), "cpu_count": os.cpu_count(),
            "machine": platform.machine(), "devices": 1}
    os.makedirs(args.out, exist_ok=True)
    atomic_write_text(os.path.join(args.out, "acting_cost.json"), json.dumps({"meta": meta, "rows": rows}, indent=1))
    table = markdown(rows)
    atomic_write_text(os.path.join(args.out, "acting_cost.md"),
                      f"# Autoregressive acting cost\n\nCommand: `{command}` (jax {jax.__version__}, "
                      f"{jax.default_backend()}, {os.cpu_count()} cores, one device). Policy only (no env), "
                      f"{args.steps} acting steps per timed call, median of {args.repeats}; mappo: actor MLP "
                      "128x128 on every agent at once; MAT / Sable: embed 64, 1 block, 1 head, agents decoded one "
                      "after another.\n\n" + table + "\n")
    print(table)


if __name__ == "__main__":
    main()
