"""Where one PPO update's time goes: env-only stepping, the rollout (env + networks), the learner
(GAE + epochs x minibatches) and the whole update, each compiled on its own and timed on one device.

    python benchmarks/update_breakdown.py                                  # mappo, rware tiny-2ag, 128 envs
    python benchmarks/update_breakdown.py --system ippo --env lbf --task 8x8-2p-2f-coop --envs 512
    python benchmarks/update_breakdown.py --network rnn --env smax --task 3m --envs 64

Prints milliseconds per update (median of ``--repeats``) and the equivalent joint env steps/s, and
the networks' matmul weights: each weight is one multiply-add per agent-step and forward pass, so
their ratio between two networks is the ratio of their compute (XLA's ``cost_analysis`` counts a
scan's body once, whatever its length, so it cannot give this for recurrent networks). For
profiling, not a results table: use ``benchmarks/throughput.py`` for the numbers we quote.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import importlib  # noqa: E402

import jax  # noqa: E402

from benchmarks.throughput import random_steps, settings_for  # noqa: E402
from envs.vector import AutoResetVecEnv  # noqa: E402
from systems.anakin import make_envs  # noqa: E402
from networks.policy import make_policy_nets  # noqa: E402
from systems.policy import policy_model  # noqa: E402
from systems.ppo import PPOConfig, gae  # noqa: E402


def timed(fn, *args, repeats: int) -> float:
    """Median seconds of a compiled call (one warm-up call first)."""
    compiled = jax.jit(fn).lower(*args).compile()
    jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_weights(params) -> int:
    """Number of weights in the kernels (2-D and stacked per-agent matrices) of a parameter tree."""
    leaves = jax.tree_util.tree_leaves_with_path(params)
    return sum(leaf.size for path, leaf in leaves if "kernel" in jax.tree_util.keystr(path))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--system", default="mappo", choices=["ippo", "mappo"])
    parser.add_argument("--env", default="rware")
    parser.add_argument("--task", default="tiny-2ag")
    parser.add_argument("--envs", type=int, default=128)
    parser.add_argument("--network", default="mlp", choices=["mlp", "rnn"])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    settings = settings_for(args.system, args.env, args.task, args.envs, 1, 1, (f"network={args.network}",))
    env, _ = make_envs(settings)
    vec = AutoResetVecEnv(env, args.envs, settings.arch.num_resets)
    system = importlib.import_module(f"systems.{args.system}_anakin").build(settings, env.spec, vec)
    env_state, timestep = vec.reset(jax.random.PRNGKey(0))
    state = system.init(jax.random.PRNGKey(1), env_state, timestep)
    cfg: PPOConfig = settings.system
    steps = cfg.rollout_length * args.envs
    one_device = jax.vmap(system.update_step, axis_name="device")  # a device axis of size 1

    def with_device(tree):
        return jax.tree.map(lambda x: x[None], tree)

    def env_only(env_state, timestep, key):
        return random_steps(vec, env_state, timestep, key, cfg.rollout_length)

    # The rollout alone, through the same policy model the system's update uses.
    nets = make_policy_nets(settings.network, env.spec, cfg.centralised_critic)
    model = policy_model(nets, env.spec, vec, cfg.rollout_length)

    def rollout_only(state, key):
        return model.collect(state, key)

    def gae_only(traj):
        return gae(traj.reward, traj.value, traj.next_value, traj.discount, traj.done, cfg.gamma, cfg.gae_lambda)

    rows = {
        "env only (random actions)": timed(env_only, env_state, timestep, jax.random.PRNGKey(2), repeats=args.repeats),
        "rollout (env + actor + critic)": timed(rollout_only, state, jax.random.PRNGKey(3), repeats=args.repeats),
        "whole update": timed(lambda s: one_device(s), with_device(state), repeats=args.repeats),
    }
    traj = jax.jit(rollout_only)(state, jax.random.PRNGKey(3)).traj
    rows["GAE"] = timed(gae_only, traj, repeats=args.repeats)
    rows["learner (whole update - rollout)"] = rows["whole update"] - rows["rollout (env + actor + critic)"]
    print(f"{args.system} ({args.network}) on {args.env}/{args.task}, {args.envs} envs x {cfg.rollout_length} steps, "
          f"{cfg.ppo_epochs} epochs x {cfg.num_minibatches} minibatches, one device:")
    for name, seconds in rows.items():
        print(f"  {name:<36} {seconds * 1e3:8.1f} ms   {steps / seconds:>12,.0f} steps/s")
    actor, critic = (matmul_weights(init(jax.random.PRNGKey(0))) for init in (nets.init_actor, nets.init_critic))
    print(f"  matmul weights (multiply-adds per agent-step and forward pass): actor {actor:,}, critic {critic:,}")


if __name__ == "__main__":
    main()
