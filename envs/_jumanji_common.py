"""Shared machinery for the Jumanji adapters (``rware``, ``lbf``, ``connector``, ``cleaner``).

Every adapter wraps one Jumanji multi-agent env built with its own time limit switched off
(``NO_TIME_LIMIT``): Jumanji then ends an episode only when the task itself ends it, so its
``last()`` is a true termination (discount 0), and the adapter adds the time-limit end itself as a
truncation (``step_count >= time_limit``, discount 1). A step on which both happen is a termination.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

from envs.types import EnvSpec, MarlEnv, Observation, TimeStep, make_timestep, tiled_global_state

# Handed to Jumanji as its time limit so that it never ends an episode on time (int32-safe).
NO_TIME_LIMIT = 2**30


def resolve_task(
    family: str, tasks: Mapping[str, Mapping[str, Any]], task: str, overrides: Mapping[str, Any]
) -> dict[str, Any]:
    """``tasks[task]`` updated with ``overrides`` (``None`` values mean "keep the default").

    Raises ``UnknownEnvError`` for an unknown task and ``TypeError`` for an unknown setting, each
    naming the valid choices.
    """
    from envs import UnknownEnvError  # envs/__init__ is fully imported by the time this runs

    if task not in tasks:
        raise UnknownEnvError(
            f"env.task={task!r} is not a task of env.name={family!r}; valid: {list(tasks)}"
        )
    settings = dict(tasks[task])
    given = {name: value for name, value in overrides.items() if value is not None}
    unknown = sorted(set(given) - set(settings))
    if unknown:
        raise TypeError(
            f"{family} task {task!r} has no setting(s) {unknown}; valid: {sorted(settings)}"
        )
    settings.update(given)
    return settings


def rgb_frame(frame: Any) -> np.ndarray:
    """A Jumanji viewer's ``rgb_array`` frame (RGBA or RGB) as an (H, W, 3) uint8 array."""
    frame = np.asarray(frame)
    if frame.dtype != np.uint8:
        frame = (np.clip(frame, 0.0, 1.0) * 255).astype(np.uint8)
    return frame[..., :3]


class JumanjiAdapter(MarlEnv):
    """One Jumanji multi-agent env behind the ``envs.types`` contract.

    Subclasses give the per-agent view (``_agents_view``) and may override the reward
    (``_reward``), the global state (``_global_state``) and the win flag (``_won``). The spec's
    ``obs_shape`` and ``global_state_dim`` are read off these hooks with ``jax.eval_shape``.
    """

    def __init__(
        self, env: Any, *, time_limit: int, global_state: bool, has_win: bool = False,
        implicit_agent_id: bool = False,
    ):
        self._env = env  # a Jumanji Environment built with time_limit=NO_TIME_LIMIT
        self._add_global_state = global_state
        self._has_win = has_win
        num_agents = self._num_agents = int(env.num_agents)
        # Shapes only: nothing is computed here.
        jstate, jts = jax.eval_shape(env.reset, jax.ShapeDtypeStruct((2,), jnp.uint32))
        view = jax.eval_shape(self._agents_view, jstate, jts)
        state_dim = 0
        if global_state:
            state_dim = int(jax.eval_shape(self._global_state, jstate, view).shape[-1])
        self.spec = EnvSpec(
            num_agents=num_agents,
            obs_shape=tuple(view.shape[1:]),
            action_kind="discrete",
            num_actions=int(np.asarray(env.action_spec.num_values).reshape(-1)[0]),
            time_limit=int(time_limit),
            global_state_dim=state_dim,
            has_win=has_win,
            implicit_agent_id=implicit_agent_id,
        )

    # ---- hooks -------------------------------------------------------------------------------
    def _agents_view(self, jstate: Any, jts: Any) -> Array:
        """(A, F) float32 per-agent views."""
        raise NotImplementedError

    def _reward(self, jstate: Any, jts: Any) -> Array:
        """(A,) or () reward; the default passes Jumanji's reward through (a scalar is tiled)."""
        return jts.reward

    def _global_state(self, jstate: Any, agents_view: Array) -> Array:
        """(A, S) float32 global state; the default is all views concatenated, tiled per agent."""
        return tiled_global_state(agents_view)

    def _won(self, jstate: Any) -> Array:
        """() bool: the task is solved in ``jstate`` (only called when ``has_win``)."""
        raise NotImplementedError

    # ---- contract ----------------------------------------------------------------------------
    def _timestep(
        self, jstate: Any, jts: Any, terminated: Array, truncated: Array, first: bool
    ) -> TimeStep:
        num_agents = self._num_agents
        view = self._agents_view(jstate, jts)  # (A, F)
        observation = Observation(
            agents_view=view,
            action_mask=jts.observation.action_mask.astype(bool),  # (A, num_actions)
            step_count=jnp.broadcast_to(jstate.step_count.astype(jnp.int32), (num_agents,)),
            global_state=self._global_state(jstate, view) if self._add_global_state else None,
        )
        extras = {"won_episode": self._won(jstate)} if self._has_win else {}
        return make_timestep(
            observation, self._reward(jstate, jts), terminated, truncated, first, extras
        )

    def reset(self, key: Array) -> tuple[Any, TimeStep]:
        jstate, jts = self._env.reset(key)
        false = jnp.zeros((), bool)
        return jstate, self._timestep(jstate, jts, false, false, first=True)

    def step(self, state: Any, action: Array) -> tuple[Any, TimeStep]:
        jstate, jts = self._env.step(state, action.astype(jnp.int32))
        terminated = jts.last()  # Jumanji's own time limit is off: every end it reports is real
        truncated = (jstate.step_count >= self.spec.time_limit) & ~terminated
        return jstate, self._timestep(jstate, jts, terminated, truncated, first=False)

    def render(self, state: Any) -> np.ndarray:
        """(H, W, 3) uint8 frame of one (unbatched) state, drawn by Jumanji's viewer."""
        return rgb_frame(self._env.render(state))


def team_reward(reward: Array, individual: bool) -> Array:
    """(A,) rewards: the per-agent rewards as they are, or their sum given to every agent."""
    if individual:
        return reward
    return jnp.broadcast_to(jnp.sum(reward), reward.shape)

