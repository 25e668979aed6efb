"""Jumanji Cleaner behind the ``envs.types`` contract, with Mava's task names (``clean-RxCxNa``).

Each agent's view is (R, C, 4) flattened: dirty tiles, walls, its own position, and tiles holding
at least one other agent (a clean tile is one that is neither dirty nor a wall, so it needs no
channel of its own). Own-position channel = implicit agent id, as in Mava.
Global state (when asked): (R, C, 3) flattened and tiled: dirty, walls, number of agents / N.
Reward: Jumanji's scalar team reward (+1 per tile cleaned, -0.5 per step) repeated per agent.
Ends: all tiles clean (or an illegal action, which masked policies never take) is a termination;
the time limit is a truncation. ``extras["won_episode"]``: no dirty tile left.
Time limits: Mava's scenario files (25 / 100 / 225 / 400 / 600 for the 2024 tasks); its later
tasks (5x5x2a, 5x5x3a, 10x10x3a, 15x15x5a, 15x15x23a, 20x20x40a) use its later default of 100.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from jax import Array
from jumanji.environments.routing.cleaner import Cleaner
from jumanji.environments.routing.cleaner.constants import DIRTY, WALL
from jumanji.environments.routing.cleaner.generator import RandomGenerator
from jumanji.environments.routing.cleaner.viewer import CleanerViewer

from envs._jumanji_common import NO_TIME_LIMIT, JumanjiAdapter, resolve_task


def _task(rows: int, cols: int, num_agents: int, time_limit: int) -> dict[str, int]:
    return dict(num_rows=rows, num_cols=cols, num_agents=num_agents, time_limit=time_limit)


TASKS: dict[str, dict[str, int]] = {
    "clean-5x5x5a": _task(5, 5, 5, 25),
    "clean-10x10x10a": _task(10, 10, 10, 100),
    "clean-15x15x15a": _task(15, 15, 15, 225),
    "clean-20x20x20a": _task(20, 20, 20, 400),
    "clean-30x30x30a": _task(30, 30, 30, 600),
    "clean-5x5x2a": _task(5, 5, 2, 100),
    "clean-5x5x3a": _task(5, 5, 3, 100),
    "clean-10x10x3a": _task(10, 10, 3, 100),
    "clean-15x15x5a": _task(15, 15, 5, 100),
    "clean-15x15x23a": _task(15, 15, 23, 100),
    "clean-20x20x40a": _task(20, 20, 40, 100),
}


def _jumanji(time_limit: int, **generator: int) -> Cleaner:
    return Cleaner(
        generator=RandomGenerator(**generator),
        time_limit=time_limit,
        viewer=CleanerViewer("Cleaner", render_mode="rgb_array"),
    )


class CleanerEnv(JumanjiAdapter):
    """Jumanji Cleaner: 4 actions (up, right, down, left); no noop."""

    def __init__(self, *, time_limit: int, global_state: bool, **generator: int):
        env = _jumanji(NO_TIME_LIMIT, **generator)
        super().__init__(env, time_limit=time_limit, global_state=global_state, has_win=True,
                         implicit_agent_id=True)

    def _occupancy(self, jstate: Any) -> tuple[Array, Array]:
        """Own position one-hot (A, R, C) bool and agents per tile (R, C) int32."""
        rows, cols = jstate.grid.shape
        loc = jstate.agents_locations  # (A, 2)
        own = (jnp.arange(rows)[None, :, None] == loc[:, 0, None, None]) & (
            jnp.arange(cols)[None, None, :] == loc[:, 1, None, None]
        )
        return own, own.sum(axis=0, dtype=jnp.int32)

    def _agents_view(self, jstate: Any, jts: Any) -> Array:
        num_agents = self._num_agents
        own, count = self._occupancy(jstate)
        shared = jnp.stack([jstate.grid == DIRTY, jstate.grid == WALL], axis=-1)  # (R, C, 2)
        view = jnp.concatenate(
            [
                jnp.broadcast_to(shared, (num_agents, *shared.shape)),  # (A, R, C, 2)
                own[..., None],  # (A, R, C, 1)
                (count - own > 0)[..., None],  # (A, R, C, 1): another agent is here
            ],
            axis=-1,
            dtype=jnp.float32,
        )
        return view.reshape(num_agents, -1)  # (A, R*C*4)

    def _global_state(self, jstate: Any, agents_view: Array) -> Array:
        num_agents = self._num_agents
        _, count = self._occupancy(jstate)
        state = jnp.stack(
            [jstate.grid == DIRTY, jstate.grid == WALL, count / num_agents],
            axis=-1,
            dtype=jnp.float32,
        )  # (R, C, 3)
        flat = state.reshape(-1)
        return jnp.broadcast_to(flat, (num_agents, flat.shape[0]))  # (A, R*C*3)

    def _won(self, jstate: Any) -> Array:
        return ~jnp.any(jstate.grid == DIRTY)


def make_task(task: str, global_state: bool = False, **kwargs: Any) -> CleanerEnv:
    """Cleaner ``task`` (a key of ``TASKS``); ``kwargs`` override its settings."""
    settings = resolve_task("cleaner", TASKS, task, kwargs)
    return CleanerEnv(global_state=global_state, **settings)


def jumanji_env(task: str, **kwargs: Any) -> Cleaner:
    """The raw Jumanji env of ``task`` with its own time limit (for comparisons and debugging)."""
    return _jumanji(**resolve_task("cleaner", TASKS, task, kwargs))
