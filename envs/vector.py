"""Batched environments with cheap auto-reset and episode metrics.

Jumanji's auto-reset wrapper calls ``lax.cond(done, reset, identity)`` inside ``vmap``; under vmap the
cond becomes a select, so every env pays a full reset on every step. Here each step computes only a
small *pool* of ``num_resets`` fresh starts and the envs that just ended take one each (the k-th
ended env takes pool slot ``k mod num_resets``). With ``num_resets >= num_envs`` every ended env gets
its own fresh start; with fewer, two envs ending on the same step may share a start state (their
actions are still sampled independently). Cost: ``num_resets`` resets per step instead of
``num_envs``.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import Array

from envs.types import MarlEnv, Observation, TimeStep


class VecState(NamedTuple):
    env_state: Any  # (E, ...)
    episode_return: Array  # (E,) running sum over time of the agent-mean reward
    episode_length: Array  # (E,) int32


class StepInfo(NamedTuple):
    """What a training step reports besides the (already reset) next timestep."""

    real_next_obs: Observation  # (E, A, ...) observation the episode actually ended on
    episode_return: Array  # (E,) return of the episode that ended here (0 elsewhere)
    episode_length: Array  # (E,) int32 length of the episode that ended here
    is_terminal_step: Array  # (E,) bool: an episode ended on this step
    won_episode: Array  # (E,) bool: the ended episode was won (False if the env has no win)


def default_num_resets(num_envs: int) -> int:
    """Pool size used when the config says ``auto``: one fresh start per 16 envs, at least one."""
    return max(1, math.ceil(num_envs / 16))


class AutoResetVecEnv:
    """``num_envs`` copies of ``env`` stepped together; ended envs restart from a reset pool."""

    def __init__(self, env: MarlEnv, num_envs: int, num_resets: int | None = None):
        self.env = env
        self.num_envs = num_envs
        self.num_resets = default_num_resets(num_envs) if num_resets is None else num_resets
        if not 1 <= self.num_resets:
            raise ValueError(f"num_resets must be >= 1, got {self.num_resets}")

    @property
    def spec(self):
        return self.env.spec

    def reset(self, key: Array) -> tuple[VecState, TimeStep]:
        env_state, timestep = jax.vmap(self.env.reset)(jax.random.split(key, self.num_envs))
        zeros = jnp.zeros((self.num_envs,), jnp.float32)
        return VecState(env_state, zeros, zeros.astype(jnp.int32)), timestep

    def step(self, state: VecState, action: Array, key: Array) -> tuple[VecState, TimeStep, StepInfo]:
        """Steps every env with ``action`` (E, A[, act_dim]); ended envs restart. Pure, jittable."""
        env_state, timestep = jax.vmap(self.env.step)(state.env_state, action)
        done = timestep.last()  # (E,)
        episode_return = state.episode_return + timestep.reward.mean(axis=-1)
        episode_length = state.episode_length + 1
        won = timestep.extras.get("won_episode", jnp.zeros_like(done))
        info = StepInfo(
            real_next_obs=timestep.observation,
            episode_return=jnp.where(done, episode_return, 0.0),
            episode_length=jnp.where(done, episode_length, 0),
            is_terminal_step=done,
            won_episode=done & won.astype(bool),
        )

        pool_state, pool_timestep = jax.vmap(self.env.reset)(jax.random.split(key, self.num_resets))
        slot = (jnp.cumsum(done) - 1) % self.num_resets  # k-th ended env -> slot k mod pool

        def restart(fresh: Array, current: Array) -> Array:
            mask = done.reshape(done.shape + (1,) * (current.ndim - 1))
            return jnp.where(mask, fresh[slot], current)

        env_state = jax.tree.map(restart, pool_state, env_state)
        # The next observation the policy sees is the fresh start; reward/discount/step_type of the
        # transition that just happened stay as they were.
        observation = jax.tree.map(restart, pool_timestep.observation, timestep.observation)
        timestep = timestep._replace(observation=observation)
        new_state = VecState(
            env_state,
            jnp.where(done, 0.0, episode_return),
            jnp.where(done, 0, episode_length),
        )
        return new_state, timestep, info
