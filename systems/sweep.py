"""In-program hyperparameter sweeps: every combination x seed is one run on the vmapped seed axis.

``+sweep.system.actor_lr=[1e-4,3e-4,1e-3]`` (several keys: every combination, in the order given)
trains ``combinations x arch.num_seeds`` runs in one compiled program. Run ``r`` is combination
``r // num_seeds`` with seed ``arch.seed + r % num_seeds``, so combination c's seed s starts from
exactly the state of seed s in a run without the sweep.

The swept values enter the program as arrays, one per run, passed to the compiled update chunk;
inside it the system is rebuilt around a config whose swept fields are those (traced) values, so a
learning rate reaches Adam, ε the clip, λ the trace, and so on, with nothing baked in as a constant
(``systems.anakin.make_update_chunk``). Only keys a system lists in its config's ``SWEEPABLE`` can be
swept: those that change no shape and no Python-level decision. Anything else (rollout length,
epochs, minibatches, network sizes, env count, switches) is refused with a pointer to Hydra's
multirun (``-m``), which compiles one program per value.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from utils.config import ConfigError, fail, section

MULTIRUN_HINT = "sweep it with Hydra's multirun instead, one program per value: python systems/<system>_anakin.py -m {key}=A,B"


@dataclasses.dataclass(frozen=True)
class Sweep:
    """Swept ``system.*`` keys (in the order given) and each key's values; empty: no sweep."""

    keys: tuple[str, ...] = ()
    values: tuple[tuple[Any, ...], ...] = ()

    def __bool__(self) -> bool:
        return bool(self.keys)

    @property
    def combinations(self) -> list[dict[str, Any]]:
        """Every combination, the last key varying fastest; ``[{}]`` without a sweep."""
        return [dict(zip(self.keys, combo)) for combo in itertools.product(*self.values)]

    @property
    def size(self) -> int:
        """The number of combinations (1 without a sweep), without building them."""
        return math.prod(len(values) for values in self.values)

    def as_config(self) -> dict[str, Any]:
        """The ``sweep`` section as config data (``parse_sweep`` takes it back)."""
        return {"system": {key: list(values) for key, values in zip(self.keys, self.values)}}


def format_value(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def combination_label(combo: Mapping[str, Any]) -> str:
    """``[actor_lr=0.0003,clip_eps=0.1]``; empty without a sweep."""
    return "[" + ",".join(f"{key}={format_value(value)}" for key, value in combo.items()) + "]" if combo else ""


def sweepable(system_cls: type) -> tuple[str, ...]:
    return tuple(getattr(system_cls, "SWEEPABLE", ()))


def parse_sweep(raw: Any, system_cls: type, raw_system: Optional[Mapping[str, Any]]) -> Sweep:
    """Validates the ``sweep`` section against ``system_cls`` (its ``SWEEPABLE`` keys, each value
    through the system's own types and checks) before anything is compiled."""
    if raw is None or raw == {}:
        return Sweep()
    if not isinstance(raw, Mapping):
        fail("sweep", raw, "must be a mapping of system keys to lists, e.g. +sweep.system.actor_lr=[1e-4,3e-4]")
    allowed = sweepable(system_cls)
    for name, part in raw.items():
        if name != "system":
            keys = list(part) if isinstance(part, Mapping) else []
            key = f"{name}.{keys[0]}" if keys else name
            raise ConfigError(f"sweep.{key}: only system.* hyperparameters can be swept inside one program "
                              f"({name}.* changes shapes or the environment); " + MULTIRUN_HINT.format(key=key))
    part = raw.get("system") or {}
    if not isinstance(part, Mapping) or not part:
        fail("sweep.system", part, "must map system keys to lists of values, e.g. +sweep.system.actor_lr=[1e-4,3e-4]")
    fields = {f.name for f in dataclasses.fields(system_cls)}
    keys, values = [], []
    for key, listed in part.items():
        full = f"sweep.system.{key}"
        if key not in fields:
            raise ConfigError(f"{full} is not a key of system; sweepable keys: {list(allowed)}")
        if key not in allowed:
            raise ConfigError(f"{full}: system.{key} changes array shapes or the program's structure, so it cannot "
                              f"be an axis of one program; " + MULTIRUN_HINT.format(key=f"system.{key}")
                              + f". Sweepable in one program: {list(allowed)}")
        if not isinstance(listed, (list, tuple)) or not listed:
            fail(full, listed, "must be a non-empty list of values, e.g. [1e-4,3e-4]")
        converted = tuple(_convert_value(system_cls, raw_system, key, value, full) for value in listed)
        if len(set(converted)) != len(converted):
            fail(full, list(listed), "must list distinct values (each names a run)")
        keys.append(key)
        values.append(converted)
    return Sweep(tuple(keys), tuple(values))


def _convert_value(system_cls: type, raw_system: Optional[Mapping[str, Any]], key: str, value: Any, full: str) -> Any:
    """One swept value through the system's own conversion and ``check`` (errors name ``full``)."""
    config = section(system_cls, {**dict(raw_system or {}), key: value}, "sweep.system")
    converted = getattr(config, key)
    if converted is None:
        fail(full, value, "must be a value, not null")
    return converted


# ----------------------------------------------------------------------------------------------
# Runs: the seed axis of a swept program
# ----------------------------------------------------------------------------------------------
def run_combinations(sweep: Sweep, num_seeds: int) -> list[dict[str, Any]]:
    """The combination of each run (``size x num_seeds`` of them; combination-major)."""
    return [combo for combo in sweep.combinations for _ in range(num_seeds)]


def run_values(sweep: Sweep, system: Any, num_seeds: int) -> dict[str, np.ndarray]:
    """Each swept key's value per run, as the arrays the compiled chunk takes (float32 / int32)."""
    combos = run_combinations(sweep, num_seeds)
    out = {}
    for key in sweep.keys:
        dtype = np.int32 if isinstance(getattr(system, key), int) else np.float32
        out[key] = np.asarray([combo[key] for combo in combos], dtype)
    return out


def with_values(system: Any, values: Mapping[str, Any]) -> Any:
    """The system config with the swept fields replaced (inside the program: traced scalars)."""
    return dataclasses.replace(system, **values)


def ranking(sweep: Sweep, num_seeds: int, returns: np.ndarray) -> list[tuple[str, float, float]]:
    """(label, mean, std over seeds) per combination, best first. ``returns``: (runs,)."""
    per = np.asarray(returns, np.float64).reshape(sweep.size, num_seeds)
    rows = [(combination_label(combo), float(r.mean()), float(r.std())) for combo, r in zip(sweep.combinations, per)]
    return sorted(rows, key=lambda row: -row[1])


def best_summary(rows: Sequence[tuple[str, float, float]], top: int = 3) -> str:
    """``best: [actor_lr=0.001] 0.952 ±0.010  [actor_lr=0.0003] 0.880 ±0.020 ...``."""
    return "best: " + "  ".join(f"{label} {mean:.3f}" + (f" ±{std:.3f}" if std else "") for label, mean, std in rows[:top])
