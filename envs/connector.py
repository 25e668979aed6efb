"""Jumanji Connector behind the ``envs.types`` contract, with Mava's task names (``con-GxGxNa``).

Jumanji gives one shared (G, G) grid in which agent ``i`` owns the values ``3i+1`` (path), ``3i+2``
(head) and ``3i+3`` (target). Each agent's view is made agent-relative, (G, G, 7) flattened:
  0-2  own path / own head / own target
  3-5  others' paths / heads / targets
  6    which other agent owns the cell: ((owner - i) mod N) / (N - 1), 0 where empty or own
(Empty cells are the ones with all channels 0; Connector has no walls.) This gives implicit agent
ids, as in Mava.
Global state (when asked): (G, G, 3) flattened and tiled: path / head / target cells marked with
their owner's absolute id, (owner + 1) / N.
Reward: as Mava, the team reward (sum over agents of Jumanji's dense per-agent rewards: +1 on
connecting, -0.03 per step while unconnected) repeated per agent; ``individual_rewards=True``
keeps the per-agent rewards.
Ends: every agent connected or blocked is a termination; the time limit is a truncation.
Jumanji's per-agent discount (0 for an agent already connected or blocked mid-episode, which Mava
keeps) is not kept: the contract has one discount per episode (0 only when the episode terminated).
``extras["won_episode"]``: all agents connected.
Time limits: grid_size ** 2 for Mava's 2024 tasks (its scenario files: 25 / 49 / 100 / 225);
con-10x10x5a and con-15x15x10a (later Mava tasks) use its later default of 100.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from jax import Array
from jumanji.environments.routing.connector import Connector
from jumanji.environments.routing.connector.generator import RandomWalkGenerator
from jumanji.environments.routing.connector.viewer import ConnectorViewer

from envs._jumanji_common import NO_TIME_LIMIT, JumanjiAdapter, resolve_task, team_reward


def _task(grid_size: int, num_agents: int, time_limit: int | None = None) -> dict[str, Any]:
    return dict(
        grid_size=grid_size,
        num_agents=num_agents,
        time_limit=grid_size**2 if time_limit is None else time_limit,
        individual_rewards=False,
    )


TASKS: dict[str, dict[str, Any]] = {
    "con-5x5x3a": _task(5, 3),
    "con-7x7x5a": _task(7, 5),
    "con-10x10x10a": _task(10, 10),
    "con-15x15x23a": _task(15, 23),
    "con-10x10x5a": _task(10, 5, time_limit=100),
    "con-15x15x10a": _task(15, 10, time_limit=100),
}


def _decode(grid: Array) -> tuple[Array, Array, Array]:
    """(G, G) grid -> owner id (G, G) int, kind one-hot (G, G, 3) bool, occupied (G, G) bool."""
    occupied = grid > 0
    owner = (grid - 1) // 3
    kind = ((grid - 1) % 3)[..., None] == jnp.arange(3)  # path, head, target
    return owner, kind & occupied[..., None], occupied


def _jumanji(grid_size: int, num_agents: int, time_limit: int) -> Connector:
    return Connector(
        generator=RandomWalkGenerator(grid_size=grid_size, num_agents=num_agents),
        time_limit=time_limit,
        viewer=ConnectorViewer("Connector", num_agents, render_mode="rgb_array"),
    )


class ConnectorEnv(JumanjiAdapter):
    """Jumanji Connector: 5 actions (noop, up, right, down, left)."""

    def __init__(
        self,
        *,
        grid_size: int,
        num_agents: int,
        time_limit: int,
        global_state: bool,
        individual_rewards: bool,
    ):
        self._individual_rewards = individual_rewards
        env = _jumanji(grid_size, num_agents, NO_TIME_LIMIT)
        super().__init__(env, time_limit=time_limit, global_state=global_state, has_win=True,
                         implicit_agent_id=True)

    def _agents_view(self, jstate: Any, jts: Any) -> Array:
        num_agents = self._num_agents
        owner, kind, occupied = _decode(jstate.grid)
        ids = jnp.arange(num_agents)[:, None, None]  # (A, 1, 1)
        own = owner == ids  # (A, G, G)
        others = occupied & ~own
        relative_id = ((owner - ids) % num_agents) / max(num_agents - 1, 1)
        view = jnp.concatenate(
            [
                own[..., None] & kind,  # (A, G, G, 3)
                others[..., None] & kind,  # (A, G, G, 3)
                jnp.where(others, relative_id, 0.0)[..., None],  # (A, G, G, 1)
            ],
            axis=-1,
            dtype=jnp.float32,
        )
        return view.reshape(num_agents, -1)  # (A, G*G*7)

    def _global_state(self, jstate: Any, agents_view: Array) -> Array:
        num_agents = self._num_agents
        owner, kind, _ = _decode(jstate.grid)
        state = jnp.where(kind, ((owner + 1) / num_agents)[..., None], 0.0)  # (G, G, 3)
        flat = state.reshape(-1).astype(jnp.float32)
        return jnp.broadcast_to(flat, (num_agents, flat.shape[0]))  # (A, G*G*3)

    def _reward(self, jstate: Any, jts: Any) -> Array:
        return team_reward(jts.reward, self._individual_rewards)

    def _won(self, jstate: Any) -> Array:
        return jnp.all(jstate.agents.connected)


def make_task(task: str, global_state: bool = False, **kwargs: Any) -> ConnectorEnv:
    """Connector ``task`` (a key of ``TASKS``); ``kwargs`` override its settings."""
    settings = resolve_task("connector", TASKS, task, kwargs)
    return ConnectorEnv(global_state=global_state, **settings)


def jumanji_env(task: str, **kwargs: Any) -> Connector:
    """The raw Jumanji env of ``task`` with its own time limit (for comparisons and debugging)."""
    settings = resolve_task("connector", TASKS, task, kwargs)
    settings.pop("individual_rewards")
    return _jumanji(**settings)
