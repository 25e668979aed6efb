"""Evaluation on separate, non-resetting envs (Mava's protocol): N episodes, one per env.

Each eval env runs until its first episode ends (a ``while_loop`` that stops when every env is
done, at most ``time_limit`` steps). Episodes are split over devices; seeds are vmapped.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import Array
from jax.sharding import Mesh, PartitionSpec as P

from envs.types import MarlEnv, TimeStep
from systems.contract import ActFn
from utils.devices import DEVICE_AXIS


class EvalResult(NamedTuple):
    episode_return: Array  # (..., N) return of each evaluation episode (sum over time of agent-mean reward)
    episode_length: Array  # (..., N)
    won_episode: Array  # (..., N) bool


class EvalCarry(NamedTuple):
    """The evaluation loop's state (N eval envs, each playing its first episode)."""

    env_state: Any
    timestep: TimeStep  # (N, A, ...)
    actor_state: Any  # e.g. the recurrent actor's hidden state, None for feed-forward
    key: Array
    t: Array  # () steps taken
    done: Array  # (N,) the env's episode has ended
    ret: Array  # (N,) return so far (sum over time of the agent-mean reward)
    length: Array  # (N,)
    won: Array  # (N,)


def run_episodes(
    act: ActFn,
    init_actor_state: Callable[[int], Any],
    env: MarlEnv,
    params: Any,
    key: Array,
    num_episodes: int,
    greedy: bool,
) -> EvalResult:
    """Plays ``num_episodes`` episodes in parallel with ``params`` (one seed, one device)."""
    reset_key, act_key = jax.random.split(key)
    env_state, timestep = jax.vmap(env.reset)(jax.random.split(reset_key, num_episodes))
    zeros = jnp.zeros((num_episodes,), jnp.float32)
    no = jnp.zeros((num_episodes,), bool)
    init = EvalCarry(env_state, timestep, init_actor_state(num_episodes), act_key, jnp.zeros((), jnp.int32),
                     no, zeros, zeros, no)

    def not_finished(carry: EvalCarry) -> Array:
        return (~carry.done.all()) & (carry.t < env.time_limit)

    def step(carry: EvalCarry) -> EvalCarry:
        key, step_key = jax.random.split(carry.key)
        action, actor_state = act(params, carry.timestep, step_key, carry.actor_state, greedy)
        env_state, timestep = jax.vmap(env.step)(carry.env_state, action)
        running = ~carry.done
        ended = running & timestep.last()
        won = carry.won
        if "won_episode" in timestep.extras:
            won = won | (ended & timestep.extras["won_episode"].astype(bool))
        return EvalCarry(env_state, timestep, actor_state, key, carry.t + 1, carry.done | ended,
                         carry.ret + jnp.where(running, timestep.reward.mean(axis=-1), 0.0),
                         carry.length + running, won)

    carry = jax.lax.while_loop(not_finished, step, init)
    return EvalResult(carry.ret, carry.length, carry.won)


def make_evaluator(
    act: ActFn,
    init_actor_state: Callable[[int], Any],
    env: MarlEnv,
    mesh: Mesh,
    num_episodes: int,
    greedy: bool,
) -> Callable[[Any, Array], EvalResult]:
    """Jitted ``(params (S, ...), keys (S, 2)) -> EvalResult (S, num_episodes)``; episodes split over devices."""
    per_device = num_episodes // mesh.size

    def local(params: Any, keys: Array) -> EvalResult:
        device = jax.lax.axis_index(DEVICE_AXIS)
        keys = jax.vmap(lambda k: jax.random.fold_in(k, device))(keys)
        return jax.vmap(
            lambda p, k: run_episodes(act, init_actor_state, env, p, k, per_device, greedy)
        )(params, keys)

    sharded = jax.shard_map(
        local, mesh=mesh, in_specs=(P(), P()), out_specs=P(None, DEVICE_AXIS), check_vma=False
    )
    return jax.jit(sharded)
