"""Config validation: a Hydra config becomes frozen, typed settings before anything compiles.

Every section is a frozen dataclass. ``section(cls, cfg, "system")`` checks that each key exists in
``cls`` (typos are caught, with the valid keys listed), converts values to the declared types, and
runs the class's ``check`` method. Every error is a ``ConfigError`` that names the full key, the
value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any, Iterable, Mapping, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A bad config value; the message names the key, the value and what is allowed."""


def fail(key: str, value: Any, allowed: str) -> typing.NoReturn:
    raise ConfigError(f"{key}={value!r} is invalid: {allowed}")


def require(condition: bool, key: str, value: Any, allowed: str) -> None:
    if not condition:
        fail(key, value, allowed)


def one_of(key: str, value: Any, choices: Iterable[Any]) -> None:
    choices = list(choices)
    require(value in choices, key, value, f"must be one of {choices}")


def positive(key: str, value: float) -> None:
    require(value > 0, key, value, "must be > 0")


def _convert(key: str, value: Any, kind: Any) -> Any:
    origin = typing.get_origin(kind)
    if origin is typing.Union or str(origin) == "types.UnionType":
        options = typing.get_args(kind)
        if value is None and type(None) in options:
            return None
        kinds = [k for k in options if k is not type(None)]
        if len(kinds) > 1:  # e.g. Union[bool, str]: the first kind the value converts to
            for option in kinds:
                try:
                    return _convert(key, value, option)
                except ConfigError:
                    pass
            fail(key, value, f"must be one of the types {[getattr(k, '__name__', k) for k in kinds]}")
        kind = kinds[0]
        origin = typing.get_origin(kind)
    if dataclasses.is_dataclass(kind):  # a nested section, e.g. logger.checkpoint
        require(isinstance(value, Mapping), key, value, "must be a mapping")
        return section(kind, value, key)
    if origin is tuple:
        require(isinstance(value, (list, tuple)), key, value, "must be a list")
        (item_kind, _ellipsis) = typing.get_args(kind)
        return tuple(_convert(f"{key}[{i}]", v, item_kind) for i, v in enumerate(value))
    if kind is bool:
        require(isinstance(value, bool), key, value, "must be true or false")
        return value
    if kind is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)  # allow 2e6 for step counts
        require(isinstance(value, int) and not isinstance(value, bool), key, value, "must be an integer")
        return value
    if kind is float:
        require(
            isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value),
            key,
            value,
            "must be a finite number",
        )
        return float(value)
    if kind is str:
        require(isinstance(value, str), key, value, "must be a string")
        return value
    if kind is dict:
        require(isinstance(value, Mapping), key, value, "must be a mapping")
        return dict(value)
    return value


def section(cls: type[T], values: Mapping[str, Any] | None, prefix: str) -> T:
    """Builds the frozen dataclass ``cls`` from the config mapping at ``prefix``."""
    values = dict(values or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    hints = typing.get_type_hints(cls)
    for key in values:
        if key not in fields:
            raise ConfigError(
                f"{prefix}.{key} is not a known key; valid keys of {prefix}: {sorted(fields)}"
            )
    kwargs = {}
    for name, field in fields.items():
        if name in values:
            kwargs[name] = _convert(f"{prefix}.{name}", values[name], hints[name])
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{prefix}.{name} is missing: it has no default and must be set")
    obj = cls(**kwargs)
    check = getattr(obj, "check", None)
    if check is not None:
        check(prefix)
    return obj


def to_container(cfg: Any) -> Any:
    """OmegaConf -> plain python containers (resolving interpolations); plain values pass through."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf
    except ImportError:  # pragma: no cover
        return cfg
    if isinstance(cfg, (DictConfig, ListConfig)):
        return OmegaConf.to_container(cfg, resolve=True)
    return cfg
