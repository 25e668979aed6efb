"""The multi-agent environment contract every system is written against.

Mava-compatible: ``Observation(agents_view, action_mask, step_count)`` plus an optional
``global_state``; per-agent reward and discount; every observation leaf has a leading agent axis A.

Termination and truncation are kept apart: ``discount`` is 0 only where the episode truly
terminated. A time-limit end is ``last()`` with ``discount == 1``, and learners bootstrap from the
real next observation there (Mava treats it as termination; we do not).
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, NamedTuple, Optional

import jax.numpy as jnp
from jax import Array

FIRST, MID, LAST = 0, 1, 2


class Observation(NamedTuple):
    agents_view: Array  # (A, *obs_shape) float32
    action_mask: Array  # (A, num_actions) bool; all True for continuous actions
    step_count: Array  # (A,) int32
    global_state: Optional[Array] = None  # (A, state_dim) float32, the same state tiled per agent


class TimeStep(NamedTuple):
    step_type: Array  # () int32: FIRST, MID or LAST
    reward: Array  # (A,) float32
    discount: Array  # (A,) float32: 0 where terminated, else 1 (truncation keeps 1)
    observation: Observation
    extras: dict[str, Array]  # e.g. {"won_episode": bool ()}; same keys on every step

    def first(self) -> Array:
        return self.step_type == FIRST

    def last(self) -> Array:
        return self.step_type == LAST

    def terminated(self) -> Array:
        """Episode ended by the task itself (no bootstrap)."""
        return self.last() & (self.discount[..., 0] == 0)

    def truncated(self) -> Array:
        """Episode ended by the time limit (bootstrap from the real next observation)."""
        return self.last() & (self.discount[..., 0] != 0)


@dataclasses.dataclass(frozen=True)
class EnvSpec:
    """Static facts about an environment that networks and systems are built from."""

    num_agents: int
    obs_shape: tuple[int, ...]  # per-agent view shape, without the agent axis
    action_kind: str  # "discrete" | "continuous"
    num_actions: int  # discrete: choices per agent; continuous: action dimension
    time_limit: int
    global_state_dim: int = 0  # 0 when the env was made without a global state
    action_low: float = -1.0  # continuous bounds (scalars, shared by all dimensions)
    action_high: float = 1.0
    has_win: bool = False  # the env reports extras["won_episode"]
    implicit_agent_id: bool = False  # views are agent-relative: no agent-id one-hot needed


class MarlEnv(abc.ABC):
    """A single (unbatched) cooperative multi-agent environment.

    ``reset(key) -> (state, TimeStep)`` and ``step(state, action) -> (state, TimeStep)`` are pure
    and jittable; batch them with ``jax.vmap`` (see ``envs.vector`` for auto-resetting batches).
    ``action`` is ``(A,)`` int32 for discrete envs and ``(A, num_actions)`` float32 otherwise.
    """

    spec: EnvSpec

    @abc.abstractmethod
    def reset(self, key: Array) -> tuple[Any, TimeStep]: ...

    @abc.abstractmethod
    def step(self, state: Any, action: Array) -> tuple[Any, TimeStep]: ...

    @property
    def num_agents(self) -> int:
        return self.spec.num_agents

    @property
    def time_limit(self) -> int:
        return self.spec.time_limit

    def render(self, state: Any) -> Any:  # optional: an RGB array (H, W, 3) uint8
        raise NotImplementedError(f"{type(self).__name__} cannot render")


def make_timestep(
    observation: Observation,
    reward: Array,
    terminated: Array,
    truncated: Array,
    first: bool = False,
    extras: Optional[dict[str, Array]] = None,
) -> TimeStep:
    """Builds a TimeStep from per-agent rewards ``(A,)`` and scalar end flags."""
    num_agents = observation.action_mask.shape[0]
    reward = jnp.broadcast_to(jnp.asarray(reward, jnp.float32), (num_agents,))
    if first:
        step_type = jnp.asarray(FIRST, jnp.int32)
    else:
        step_type = jnp.where(terminated | truncated, LAST, MID).astype(jnp.int32)
    discount = jnp.broadcast_to(jnp.where(terminated, 0.0, 1.0), (num_agents,)).astype(jnp.float32)
    return TimeStep(step_type, reward, discount, observation, dict(extras or {}))


def tiled_global_state(agents_view: Array) -> Array:
    """Default global state: all agents' views concatenated, tiled per agent. (A, A*prod(obs))."""
    num_agents = agents_view.shape[0]
    flat = agents_view.reshape(-1).astype(jnp.float32)
    return jnp.broadcast_to(flat, (num_agents, flat.shape[0]))
