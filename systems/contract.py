"""What a system gives the driver (``System``), how it is built (``SystemBuilder``), and the few
facts every system reports the same way (episode statistics, the evaluation policy ``ActFn``).

The driver (``systems.anakin``) and the evaluator import this module and nothing of the algorithm
layer; every algorithm module imports it and builds a ``System``. Everything is per seed: the
driver vmaps seeds and shards the env-batched fields over devices.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

from envs.types import EnvSpec, TimeStep
from envs.vector import AutoResetVecEnv, StepInfo


class ActFn(Protocol):
    """(params, timestep (N, A, ...), key, actor_state, greedy) -> (action (N, A, ...), actor_state)."""

    def __call__(self, params: Any, timestep: TimeStep, key: Array, actor_state: Any, greedy: bool) -> tuple[Array, Any]: ...


class System(NamedTuple):
    """An algorithm, as the driver sees it.

    The learner state is any NamedTuple the system defines; its field ``params`` (if it has one)
    is what the non-finite guard inspects, ``env_fields`` name the fields with an env axis.
    ``update_step`` returns per-update metrics; those of ``EpisodeStats`` are summed by the console,
    ``console_metrics`` are shown on its line (chunk means), and ``report`` may draw the system's
    own pictures into the run folder at the end (e.g. B2MAPO's learned schedule).
    """

    init: Callable[[Array, Any, Any], Any]  # (key, env_state (E_all, ...), timestep) -> learner state
    update_step: Callable[[Any], tuple[Any, dict[str, Array]]]  # one iteration on one device
    act: ActFn  # the evaluation (executed) policy
    init_actor_state: Callable[[int], Any]  # num eval envs -> actor state (None for feed-forward)
    eval_params: Callable[[Any], Any]  # learner state -> what ``act`` takes
    env_fields: tuple[str, ...] = ("env_state", "timestep")  # learner-state fields with an env axis
    console_metrics: tuple[tuple[str, str], ...] = ()  # (label, metric) shown on the console line
    report: Optional[Callable[[str, list[dict[str, Any]]], None]] = None  # (run dir, per-chunk metrics) -> files


SystemBuilder = Callable[[Any, EnvSpec, AutoResetVecEnv], System]  # (Settings, spec, vec env) -> System


def needs_global_state(system_config: Any) -> bool:
    """Whether the system's envs must provide ``Observation.global_state`` (a config declares it
    with a ``needs_global_state`` property; default: no)."""
    return bool(getattr(system_config, "needs_global_state", False))


def stacked_eval_params(system: System, state: Any) -> Any:
    """Each seed's evaluation parameters, (S, ...)."""
    return jax.vmap(system.eval_params)(state)


class EpisodeStats(NamedTuple):
    """Sums over the episodes that ended during an update (divide by ``count`` for means)."""

    return_sum: Array
    length_sum: Array
    won_sum: Array
    count: Array


def episode_stats(info: StepInfo) -> EpisodeStats:
    """Sums over the envs whose episode ended on this step."""
    return EpisodeStats(
        return_sum=info.episode_return.sum(),
        length_sum=info.episode_length.sum().astype(jnp.float32),
        won_sum=info.won_episode.sum().astype(jnp.float32),
        count=info.is_terminal_step.sum().astype(jnp.float32),
    )


def train_summary(metrics: dict[str, np.ndarray]) -> dict[str, float]:
    """Chunk means of the training metrics (losses, ...) and the mean return of finished episodes."""
    out = {name: float(np.mean(v)) for name, v in metrics.items() if name not in EpisodeStats._fields}
    if "count" in metrics:
        episodes = float(np.sum(metrics["count"]))
        out["episodes"] = episodes
        out["episode_return"] = float(np.sum(metrics["return_sum"]) / max(episodes, 1.0))
    return out
