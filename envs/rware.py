"""Jumanji RobotWarehouse behind the ``envs.types`` contract, with Mava's task names.

Observation: Jumanji's per-agent vector view (sensor_range 1: 66 features) cast to float32.
Reward: Jumanji's scalar team reward (+1 per requested shelf delivered), repeated per agent.
Ends: Jumanji RWARE ends an episode when two agents collide; that is a termination (discount 0),
unlike the original RWARE. The time limit (500 steps) is a truncation (discount 1).
Global state (when asked): all agents' views concatenated, tiled per agent (Mava's default).
"""

from __future__ import annotations

from typing import Any

from jax import Array
from jumanji.environments.routing.robot_warehouse import RobotWarehouse
from jumanji.environments.routing.robot_warehouse.generator import RandomGenerator
from jumanji.environments.routing.robot_warehouse.viewer import RobotWarehouseViewer

from envs._jumanji_common import NO_TIME_LIMIT, JumanjiAdapter, resolve_task

_TIME_LIMIT = 500


def _task(
    column_height: int,
    shelf_rows: int,
    shelf_columns: int,
    num_agents: int,
    sensor_range: int,
    request_queue_size: int,
) -> dict[str, int]:
    return dict(
        column_height=column_height,
        shelf_rows=shelf_rows,
        shelf_columns=shelf_columns,
        num_agents=num_agents,
        sensor_range=sensor_range,
        request_queue_size=request_queue_size,
        time_limit=_TIME_LIMIT,
    )


# Mava's scenario configs (column_height, shelf_rows, shelf_columns, agents, sensor_range, queue).
TASKS: dict[str, dict[str, int]] = {
    "tiny-2ag": _task(8, 1, 3, 2, 1, 2),
    "tiny-4ag": _task(8, 1, 3, 4, 1, 4),
    "tiny-4ag-easy": _task(8, 1, 3, 4, 1, 8),
    "small-4ag": _task(8, 2, 3, 4, 1, 4),
    "medium-4ag": _task(8, 2, 5, 4, 1, 4),
    "medium-6ag": _task(8, 2, 5, 6, 1, 6),
    "large-4ag": _task(8, 3, 5, 4, 1, 4),
    "large-8ag": _task(8, 3, 5, 8, 1, 8),
    "xlarge-4ag": _task(8, 4, 5, 4, 1, 4),
    "tiny-2ag-hard": _task(8, 1, 3, 2, 1, 1),
    "tiny-4ag-hard": _task(8, 1, 3, 4, 1, 2),
    "small-4ag-hard": _task(8, 2, 3, 4, 1, 2),
    "medium-4ag-hard": _task(8, 2, 5, 4, 1, 2),
    "large-4ag-hard": _task(8, 3, 5, 4, 1, 2),
    "large-8ag-hard": _task(8, 3, 5, 8, 1, 4),
    "xlarge-4ag-hard": _task(8, 4, 5, 4, 1, 2),
}


def _jumanji(time_limit: int, **generator: int) -> RobotWarehouse:
    layout = RandomGenerator(**generator)
    viewer = RobotWarehouseViewer(layout.grid_size, layout.goals, "RobotWarehouse", "rgb_array")
    return RobotWarehouse(generator=layout, time_limit=time_limit, viewer=viewer)


class RwareEnv(JumanjiAdapter):
    """Jumanji RobotWarehouse: 5 actions (noop, forward, left, right, toggle load)."""

    def __init__(self, *, time_limit: int, global_state: bool, **generator: int):
        env = _jumanji(NO_TIME_LIMIT, **generator)
        super().__init__(env, time_limit=time_limit, global_state=global_state)

    def _agents_view(self, jstate: Any, jts: Any) -> Array:
        return jts.observation.agents_view.astype("float32")  # (A, F)


def make_task(task: str, global_state: bool = False, **kwargs: Any) -> RwareEnv:
    """RWARE ``task`` (a key of ``TASKS``); ``kwargs`` override its settings (e.g. time_limit)."""
    settings = resolve_task("rware", TASKS, task, kwargs)
    return RwareEnv(global_state=global_state, **settings)


def jumanji_env(task: str, **kwargs: Any) -> RobotWarehouse:
    """The raw Jumanji env of ``task`` with its own time limit (for comparisons and debugging)."""
    return _jumanji(**resolve_task("rware", TASKS, task, kwargs))
