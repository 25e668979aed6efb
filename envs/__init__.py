"""Environments behind one multi-agent contract (see ``envs.types``).

``envs.make(env_name, task, global_state=...)`` builds a single env; ``envs.tasks(env_name)`` lists
the valid task names. Each family lives in its own module exposing ``TASKS`` (task name -> settings)
and ``make_task(task, global_state, **kwargs)``; optional suites (jaxmarl) are imported lazily.
"""

from __future__ import annotations

import importlib
from typing import Any

from envs.types import EnvSpec, MarlEnv, Observation, TimeStep  # noqa: F401
from envs.vector import AutoResetVecEnv, StepInfo, VecState  # noqa: F401

# env_name -> (module, pip extra needed or None)
FAMILIES: dict[str, tuple[str, str | None]] = {
    "rware": ("envs.rware", None),
    "lbf": ("envs.lbf", None),
    "connector": ("envs.connector", None),
    "cleaner": ("envs.cleaner", None),
    "smax": ("envs.smax", "jaxmarl"),
    "mpe": ("envs.mpe", "jaxmarl"),
    "coordsum": ("envs.coordsum", None),
}


class UnknownEnvError(ValueError):
    pass


def _family(env_name: str) -> Any:
    if env_name not in FAMILIES:
        raise UnknownEnvError(
            f"env.name={env_name!r} is not a known environment; valid: {sorted(FAMILIES)}"
        )
    module, extra = FAMILIES[env_name]
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        if extra is None or err.name is None or err.name.split(".")[0] != extra:
            raise
        raise ModuleNotFoundError(
            f"env.name={env_name!r} needs the optional package {extra!r}: "
            f"pip install -e '.[{extra}]'"
        ) from err


def tasks(env_name: str) -> list[str]:
    """The task names ``env_name`` accepts (Mava's names where Mava has the task)."""
    return list(_family(env_name).TASKS)


def make(env_name: str, task: str, *, global_state: bool = False, **kwargs: Any) -> MarlEnv:
    """One unbatched env of ``env_name``/``task``; ``global_state`` adds the centralised state."""
    family = _family(env_name)
    if task not in family.TASKS:
        raise UnknownEnvError(
            f"env.task={task!r} is not a task of env.name={env_name!r}; valid: {list(family.TASKS)}"
        )
    return family.make_task(task, global_state=global_state, **kwargs)
