"""Evaluation on separate, non-resetting envs (Mava's protocol): N episodes, one per env.

Each eval env runs until its first episode ends (a ``while_loop`` that stops when every env is
done, at most ``time_limit`` steps). Episodes are split over devices; seeds are vmapped.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Protocol

import jax
import jax.numpy as jnp
from jax import Array
from jax.sharding import Mesh, PartitionSpec as P

from envs.types import MarlEnv, TimeStep
from utils.devices import DEVICE_AXIS


class ActFn(Protocol):
    """(params, timestep (N, A, ...), key, actor_state, greedy) -> (action (N, A, ...), actor_state)."""

    def __call__(self, params: Any, timestep: TimeStep, key: Array, actor_state: Any, greedy: bool) -> tuple[Array, Any]: ...


class EvalResult(NamedTuple):
    episode_return: Array  # (..., N) return of each evaluation episode (sum over time of agent-mean reward)
    episode_length: Array  # (..., N)
    won_episode: Array  # (..., N) bool


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
    init = (env_state, timestep, init_actor_state(num_episodes), act_key, jnp.zeros((), jnp.int32),
            jnp.zeros((num_episodes,), bool), zeros, zeros, jnp.zeros((num_episodes,), bool))

    def not_finished(carry: tuple) -> Array:
        return (~carry[5].all()) & (carry[4] < env.time_limit)

    def step(carry: tuple) -> tuple:
        env_state, timestep, actor_state, key, t, done, ret, length, won = carry
        key, step_key = jax.random.split(key)
        action, actor_state = act(params, timestep, step_key, actor_state, greedy)
        env_state, timestep = jax.vmap(env.step)(env_state, action)
        running = ~done
        ret = ret + jnp.where(running, timestep.reward.mean(axis=-1), 0.0)
        length = length + running
        ended = running & timestep.last()
        if "won_episode" in timestep.extras:
            won = won | (ended & timestep.extras["won_episode"].astype(bool))
        return env_state, timestep, actor_state, key, t + 1, done | ended, ret, length, won

    carry = jax.lax.while_loop(not_finished, step, init)
    return EvalResult(carry[6], carry[7], carry[8])


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
