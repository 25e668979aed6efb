"""Orbax checkpoints of a whole run, written atomically, and clear errors when one cannot be read.

Layout: ``<run dir>/checkpoints/<k>/`` after the k-th evaluation (k update chunks done), with three
items: ``state`` (the full learner state: parameters, optimiser states, counters, RNG keys, env
states; sharded arrays are restored onto the target's sharding), ``host`` (numpy arrays the host
loop keeps, e.g. the best parameters for the absolute metric) and ``meta`` (JSON: the run's config,
its evaluation history, how to rebuild the system).

Atomicity: Orbax writes each checkpoint into ``<k>.orbax-checkpoint-tmp-*`` and renames it to
``<k>`` only once every item is on disk, so a process killed mid-write leaves the earlier
checkpoints as they were; the half-written folder is ignored (and removed by the next save).
Retention: the ``max_to_keep`` most recent checkpoints plus, with ``keep_best``, the one with the
best score.
"""

from __future__ import annotations

import importlib
import os
import re
import sys
from typing import Any, Optional

import jax

FORMAT_VERSION = 1
ITEMS = ("state", "host", "meta")
_STEP_NAME = re.compile(r"^\d+$")


class CheckpointError(RuntimeError):
    """A checkpoint path that does not exist, holds no checkpoint, or cannot be read."""


# ----------------------------------------------------------------------------------------------
# Finding checkpoints
# ----------------------------------------------------------------------------------------------
def committed_steps(directory: str) -> list[int]:
    """Finished checkpoints in ``directory`` (sorted); half-written ``*.orbax-checkpoint-tmp-*`` are not."""
    if not os.path.isdir(directory):
        return []
    return sorted(int(name) for name in os.listdir(directory)
                  if _STEP_NAME.match(name) and os.path.isdir(os.path.join(directory, name)))


def step_path(directory: str, step: int) -> str:
    return os.path.join(directory, str(step))


def resolve(path: str) -> tuple[str, Optional[int]]:
    """A run folder, its ``checkpoints`` folder or one numbered checkpoint -> (checkpoints folder, step).

    ``step`` is None unless ``path`` names one checkpoint. Raises ``CheckpointError`` otherwise.
    """
    given = path
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint path {given!r} does not exist")
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint path {given!r} is a file; give a run folder, its "
                              "checkpoints/ folder or one numbered checkpoint folder inside it")
    name = os.path.basename(path)
    if _STEP_NAME.match(name) and any(os.path.exists(os.path.join(path, item)) for item in ITEMS):
        return os.path.dirname(path), int(name)
    if os.path.isdir(os.path.join(path, "checkpoints")):
        path = os.path.join(path, "checkpoints")
    if not committed_steps(path):
        raise CheckpointError(f"no checkpoint found in {given!r}: expected a run folder with a "
                              "checkpoints/ folder, that folder, or one numbered checkpoint in it")
    return path, None


def pick_step(directory: str, step: Optional[int | str] = None) -> int:
    """``step``: a number, "latest" / None, or "best" (the highest score recorded in ``meta``)."""
    steps = committed_steps(directory)
    if not steps:
        raise CheckpointError(f"no finished checkpoint in {directory}")
    if step is None or step == "latest":
        return steps[-1]
    if step == "best":
        scores = {s: read_meta(directory, s).get("score", float("-inf")) for s in steps}
        return max(steps, key=lambda s: (scores[s], s))
    try:
        number = int(step)
    except ValueError:
        raise CheckpointError(f"checkpoint {step!r}: expected latest, best or a number") from None
    if number not in steps:
        raise CheckpointError(f"no checkpoint {step} in {directory}; available: {steps}")
    return number


def _check_complete(directory: str, step: int) -> str:
    path = step_path(directory, step)
    missing = [item for item in ITEMS if not os.path.isdir(os.path.join(path, item))]
    if missing:
        raise CheckpointError(f"checkpoint {path} is incomplete (missing {missing}); it is not a "
                              f"checkpoint of this library or was damaged. {_others(directory, step)}")
    return path


def _others(directory: str, step: int) -> str:
    earlier = [s for s in committed_steps(directory) if s != step]
    if not earlier:
        return "There is no other checkpoint in that folder."
    return (f"Other checkpoints there: {earlier}; delete {step_path(directory, step)} to fall back "
            "on the latest of them.")


def _short(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:300] if text else ''}"


# ----------------------------------------------------------------------------------------------
# PRNG key arrays (typed keys are stored as their raw key data)
# ----------------------------------------------------------------------------------------------
def _is_typed_key(x: Any) -> bool:
    return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def to_savable(tree: Any) -> Any:
    return jax.tree.map(lambda x: jax.random.key_data(x) if _is_typed_key(x) else x, tree)


def from_savable(saved: Any, like: Any) -> Any:
    return jax.tree.map(
        lambda s, t: jax.random.wrap_key_data(s, impl=jax.random.key_impl(t)) if _is_typed_key(t) else s,
        saved, like,
    )


# ----------------------------------------------------------------------------------------------
# Writing and reading
# ----------------------------------------------------------------------------------------------
def _manager(directory: str, max_to_keep: Optional[int] = None, keep_best: bool = False,
             create: bool = False) -> Any:
    import orbax.checkpoint as ocp

    policies = ocp.checkpoint_managers
    keep: list[Any] = [policies.LatestN(n=max_to_keep)]  # n=None keeps every checkpoint
    if keep_best:
        keep.append(policies.BestN(get_metric_fn=lambda metrics: metrics["score"], n=1))
    options = ocp.CheckpointManagerOptions(
        enable_async_checkpointing=False,
        preservation_policy=policies.AnyPreservationPolicy(keep),
        best_fn=lambda metrics: metrics["score"],  # makes Orbax store the score, so a resumed run sees it
        best_mode="max",
        cleanup_tmp_directories=create,
        create=create,
    )
    return ocp.CheckpointManager(os.path.abspath(directory), options=options)


class Checkpointer:
    """Saves ``(learner state, host arrays, meta)`` as checkpoint ``step``; keeps the last K and the best."""

    def __init__(self, directory: str, max_to_keep: int, keep_best: bool):
        self.directory = os.path.abspath(directory)
        os.makedirs(self.directory, exist_ok=True)
        self._manager = _manager(self.directory, max_to_keep, keep_best, create=True)

    def save(self, step: int, learner_state: Any, host: Any, meta: dict[str, Any], score: float) -> str:
        """Blocks until checkpoint ``step`` is complete on disk; returns its folder."""
        import orbax.checkpoint as ocp

        meta = {**meta, "format": FORMAT_VERSION, "step": int(step), "score": float(score)}
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(to_savable(learner_state)),
            host=ocp.args.StandardSave(host),
            meta=ocp.args.JsonSave(meta),
        )
        if step in self._manager.all_steps():  # a run resumed from an earlier checkpoint redoes it
            self._manager.delete(step)
        self._manager.save(step, args=args, metrics={"score": float(score)}, force=True)
        self._manager.wait_until_finished()
        return step_path(self.directory, step)

    def close(self) -> None:
        self._manager.close()


def read_meta(directory: str, step: int) -> dict[str, Any]:
    """The JSON ``meta`` item of checkpoint ``step`` (config, history, system entry points)."""
    import orbax.checkpoint as ocp

    path = _check_complete(directory, step)
    manager = _manager(directory)
    try:
        meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    except Exception as err:  # noqa: BLE001 - any Orbax failure here means an unreadable checkpoint
        raise CheckpointError(f"checkpoint {path} cannot be read ({_short(err)}); it is incomplete or "
                              f"corrupt. {_others(directory, step)}") from err
    finally:
        manager.close()
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION or "config" not in meta:
        raise CheckpointError(f"checkpoint {path} has no run metadata of format {FORMAT_VERSION}; it was "
                              "not written by this library's driver")
    return meta


def restore(directory: str, step: int, learner_target: Any = None, host_target: Any = None) -> tuple[Any, Any, dict]:
    """(learner state, host arrays, meta) of checkpoint ``step``, each restored onto its target's
    shapes, dtypes and shardings (numpy targets give numpy arrays); an item without a target is None."""
    import orbax.checkpoint as ocp

    meta = read_meta(directory, step)
    path = step_path(directory, step)
    items = {}
    if learner_target is not None:
        items["state"] = ocp.args.StandardRestore(to_savable(learner_target))
    if host_target is not None:
        items["host"] = ocp.args.StandardRestore(host_target)
    manager = _manager(directory)
    try:
        restored = manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as err:  # noqa: BLE001
        raise CheckpointError(f"checkpoint {path} cannot be restored ({_short(err)}); it is corrupt or "
                              f"was written by a different system or config. {_others(directory, step)}") from err
    finally:
        manager.close()
    state = from_savable(restored.state, learner_target) if learner_target is not None else None
    return state, (restored.host if host_target is not None else None), meta


# ----------------------------------------------------------------------------------------------
# What rebuilds the system: ``module:qualname`` names saved in ``meta``
# ----------------------------------------------------------------------------------------------
def entry_point(obj: Any) -> str:
    """``module:qualname`` of a function or class, importable later (also from a script run as
    ``python systems/x_anakin.py``, whose module is ``__main__``)."""
    module = obj.__module__
    if module == "__main__":
        main = sys.modules["__main__"]
        spec = getattr(main, "__spec__", None)
        if spec is not None and spec.name:
            module = spec.name
        elif getattr(main, "__file__", None):
            root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
            rel = os.path.relpath(os.path.abspath(main.__file__), root)
            if not rel.startswith(".."):
                module = rel[:-3].replace(os.sep, ".")
    return f"{module}:{obj.__qualname__}"


def load_entry_point(name: str) -> Any:
    """The object ``entry_point`` named; ``CheckpointError`` if it cannot be imported."""
    module, _, qualname = name.partition(":")
    if "<" in qualname or module == "__main__":
        raise CheckpointError(f"the checkpoint's system was built by {name}, which cannot be imported "
                              "again; build systems with module-level functions")
    try:
        obj: Any = importlib.import_module(module)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as err:
        raise CheckpointError(f"the checkpoint's system {name} cannot be imported: {err}") from err
    return obj
