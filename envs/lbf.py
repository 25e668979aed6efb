"""Jumanji LevelBasedForaging behind the ``envs.types`` contract, with Mava's task names.

Tasks: ``[2s-]{grid}x{grid}-{agents}p-{food}f[-coop]``: "2s" = sight (fov) 2, else the whole grid;
"-coop" = force_coop; max_agent_level 2; time limit 100.
Observation: Jumanji's vector observer, 3 * (food + agents) features (y, x, level per entity).
Reward: as Mava (``use_individual_rewards=False``): the sum of the agents' normalised rewards,
repeated per agent; ``individual_rewards=True`` keeps Jumanji's per-agent rewards.
Ends: all food eaten is a termination (discount 0); the time limit is a truncation (discount 1).
Jumanji LBF itself reports the time limit as a truncation too; the adapter does its own check.
Global state (when asked): all agents' views concatenated, tiled per agent (Mava's default).
"""

from __future__ import annotations

from typing import Any

from jax import Array
from jumanji.environments.routing.lbf import LevelBasedForaging
from jumanji.environments.routing.lbf.generator import RandomGenerator
from jumanji.environments.routing.lbf.viewer import LevelBasedForagingViewer

from envs._jumanji_common import NO_TIME_LIMIT, JumanjiAdapter, resolve_task, team_reward

_TIME_LIMIT = 100
_MAX_AGENT_LEVEL = 2


def _task(
    grid_size: int, num_agents: int, num_food: int, fov: int | None = None, coop: bool = False
) -> dict[str, Any]:
    return dict(
        grid_size=grid_size,
        fov=grid_size if fov is None else fov,
        num_agents=num_agents,
        num_food=num_food,
        max_agent_level=_MAX_AGENT_LEVEL,
        force_coop=coop,
        time_limit=_TIME_LIMIT,
        individual_rewards=False,
    )


TASKS: dict[str, dict[str, Any]] = {
    "2s-8x8-2p-2f-coop": _task(8, 2, 2, fov=2, coop=True),
    "8x8-2p-2f-coop": _task(8, 2, 2, coop=True),
    "2s-10x10-3p-3f": _task(10, 3, 3, fov=2),
    "10x10-3p-3f": _task(10, 3, 3),
    "15x15-3p-5f": _task(15, 3, 5),
    "15x15-4p-3f": _task(15, 4, 3),
    "15x15-4p-5f": _task(15, 4, 5),
    "15x15-4p-5f-coop": _task(15, 4, 5, coop=True),
    "2s-15x15-4p-5f-coop": _task(15, 4, 5, fov=2, coop=True),
    "20x20-3p-5f-coop": _task(20, 3, 5, coop=True),
    "20x20-4p-5f-coop": _task(20, 4, 5, coop=True),
    "2s-20x20-3p-5f-coop": _task(20, 3, 5, fov=2, coop=True),
    "2s-20x20-4p-5f-coop": _task(20, 4, 5, fov=2, coop=True),
}


def _jumanji(time_limit: int, **generator: Any) -> LevelBasedForaging:
    return LevelBasedForaging(
        generator=RandomGenerator(**generator),
        viewer=LevelBasedForagingViewer(generator["grid_size"], "LBF", "rgb_array"),
        time_limit=time_limit,
    )


class LbfEnv(JumanjiAdapter):
    """Jumanji LBF: 6 actions (noop, up, down, left, right, load)."""

    def __init__(
        self, *, time_limit: int, global_state: bool, individual_rewards: bool, **generator: Any
    ):
        self._individual_rewards = individual_rewards
        env = _jumanji(NO_TIME_LIMIT, **generator)
        super().__init__(env, time_limit=time_limit, global_state=global_state)

    def _agents_view(self, jstate: Any, jts: Any) -> Array:
        return jts.observation.agents_view.astype("float32")  # (A, 3 * (food + agents))

    def _reward(self, jstate: Any, jts: Any) -> Array:
        return team_reward(jts.reward, self._individual_rewards)


def make_task(task: str, global_state: bool = False, **kwargs: Any) -> LbfEnv:
    """LBF ``task`` (a key of ``TASKS``); ``kwargs`` override its settings (e.g. time_limit)."""
    settings = resolve_task("lbf", TASKS, task, kwargs)
    return LbfEnv(global_state=global_state, **settings)


def jumanji_env(task: str, **kwargs: Any) -> LevelBasedForaging:
    """The raw Jumanji env of ``task`` with its own time limit (for comparisons and debugging)."""
    settings = resolve_task("lbf", TASKS, task, kwargs)
    settings.pop("individual_rewards")
    return _jumanji(**settings)
