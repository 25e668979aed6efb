"""Resuming runs: the record a checkpoint holds, finding the checkpoint ``logger.resume`` asks
for, checking that its config matches this run's, and restoring the learner state and host record.

A checkpoint is ``utils.checkpointing``'s three items: the learner state (any NamedTuple a system
defines), the host items (evaluation parameters, best parameters and returns) and JSON meta (the
run's config, its evaluations so far, how to rebuild the system).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Optional

import jax
import numpy as np

from systems.contract import System, stacked_eval_params
from systems.settings import Settings, config_dict, load_settings
from utils import checkpointing
from utils.checkpointing import CheckpointError
from utils.config import ConfigError


@dataclasses.dataclass
class Evaluation:
    """One evaluation: ``index`` 0 is before training, k after k update chunks."""

    index: int
    step: int  # env steps per seed
    elapsed: float  # training seconds so far (compilation excluded)
    metrics: dict[str, np.ndarray]  # name -> (S,): mean_episode_return, mean_episode_length, ...

    def to_json(self) -> dict[str, Any]:
        return {"index": self.index, "step": self.step, "elapsed": self.elapsed,
                "metrics": {name: np.asarray(v).tolist() for name, v in self.metrics.items()}}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Evaluation":
        return cls(int(data["index"]), int(data["step"]), float(data["elapsed"]),
                   {name: np.asarray(v, np.float64) for name, v in data["metrics"].items()})


@dataclasses.dataclass
class HostRecord:
    """What the host loop carries from chunk to chunk; saved with every checkpoint."""

    evaluations: list[Evaluation]
    best_return: np.ndarray  # (S,) best mean evaluation return so far, per seed
    best_params: Any  # host copy (S, ...) of each seed's best evaluated parameters
    train_seconds: float = 0.0

    @property
    def chunks_done(self) -> int:
        return self.evaluations[-1].index



def save_checkpoint(checkpointer: checkpointing.Checkpointer, index: int, state: Any, params: Any,
                    record: HostRecord, meta_static: dict[str, Any]) -> str:
    """Checkpoint ``index``: learner state, host record, and the evaluation parameters on their own
    (``params``, so that evaluation can load them without the learner state)."""
    meta = {**meta_static, "eval_index": index, "env_steps": record.evaluations[-1].step,
            "train_seconds": record.train_seconds, "evaluations": [e.to_json() for e in record.evaluations]}
    host = {"best_params": record.best_params, "best_return": np.asarray(record.best_return, np.float64),
            "params": params}
    score = float(np.mean(record.evaluations[-1].metrics["mean_episode_return"]))
    return checkpointer.save(index, state, host, meta, score)



# arch keys that do not change what is computed (the device count, which does, is compared on its own);
# process_id and the coordinator differ between the processes of one multi-host run
NOT_TRAINING = ("compilation_cache", "distributed", "coordinator_address", "num_processes", "process_id")


def training_config(config: dict[str, Any], num_devices: int) -> dict[str, Any]:
    """The parts of a config that change what is computed (the logger section does not)."""
    arch = {key: value for key, value in config["arch"].items() if key not in NOT_TRAINING}
    sweep = {"sweep": config["sweep"]} if config.get("sweep") else {}
    return {"arch": arch, **{name: config[name] for name in ("env", "network", "system")}, **sweep, "devices": num_devices}


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_flat(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: tree}


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    a, b = _flat(saved), _flat(current)
    return [f"{key}: {a.get(key, '<missing>')!r} in the checkpoint, {b.get(key, '<missing>')!r} now"
            for key in sorted(set(a) | set(b)) if a.get(key) != b.get(key)]


def saved_training_config(meta: dict[str, Any], system_cls: type) -> dict[str, Any]:
    """The training config of a checkpoint as this code reads it: keys added to the code since the
    checkpoint was written take their defaults. Raises ``ConfigError`` if the code no longer accepts it."""
    config = {name: meta["config"][name] for name in ("arch", "env", "network", "system", "sweep") if name in meta["config"]}
    return training_config(config_dict(load_settings(config, system_cls)), meta.get("num_devices", -1))


def _same_run(config: dict[str, Any], settings: Settings) -> bool:
    return (config["system"].get("name"), config["env"].get("name"), config["env"].get("task"), config["arch"].get("seed")) == (
        settings.system.name, settings.env.name, settings.env.task, settings.arch.seed)


def find_resume_point(settings: Settings, run_dir: Optional[str], say: Callable[[str], None]) -> Optional[tuple[str, int]]:
    """(checkpoints folder, checkpoint) that ``logger.resume`` asks to continue, or None for a new run.

    ``true``: this run folder's checkpoints if any, else the most recent checkpoint under
    ``logger.base_dir`` with the same training config (none: a new run starts, saying why). A path:
    that run folder, its checkpoints folder (latest checkpoint) or one numbered checkpoint in it.
    """
    resume = settings.logger.resume
    if resume is False:
        return None
    if isinstance(resume, str):
        directory, step = checkpointing.resolve(resume)
        return directory, checkpointing.pick_step(directory, step)
    if run_dir and checkpointing.committed_steps(os.path.join(run_dir, "checkpoints")):
        directory = os.path.join(run_dir, "checkpoints")
        return directory, checkpointing.pick_step(directory)
    wanted = training_config(config_dict(settings), settings.num_devices)
    found, near = [], []
    base = settings.logger.base_dir
    for entry in (os.scandir(base) if os.path.isdir(base) else []):
        directory = os.path.join(entry.path, "checkpoints")
        steps = checkpointing.committed_steps(directory)
        if not steps:
            continue
        try:
            meta = checkpointing.read_meta(directory, steps[-1])
        except CheckpointError as err:
            say(f"resume: skipping {directory}: {err}")
            continue
        when = os.path.getmtime(checkpointing.step_path(directory, steps[-1]))
        try:
            differences = config_differences(saved_training_config(meta, type(settings.system)), wanted)
        except ConfigError as err:
            differences = [f"its config is not valid for this code ({err})"]
        if not differences:
            found.append((when, directory, steps[-1]))
        elif _same_run(meta["config"], settings):
            near.append((when, directory, differences))
    if found:
        _, directory, step = max(found)
        return directory, step
    if near:
        _, directory, differences = max(near)
        say(f"logger.resume=true: the latest run of this system, task and seed under {base}/ ({directory}) "
            f"has a different config ({'; '.join(differences)}); starting a new run")
    else:
        say(f"logger.resume=true: no checkpoint of this config under {base}/; starting a new run")
    return None



def check_resume_config(saved: dict[str, Any], current: dict[str, Any], explicit: bool, where: str) -> list[str]:
    """Differences between a checkpoint's training config and this run's that resuming may accept.

    None for an exact resume. On an explicit ``logger.resume=<path>``, changed ``system.*``
    hyperparameters (not ``system.name``) are accepted and returned, e.g. a lower learning rate after
    a divergence; anything else raises ``CheckpointError`` listing the differences.
    """
    a, b = _flat(saved), _flat(current)
    changed = [key for key in sorted(a.keys() | b.keys()) if a.get(key) != b.get(key)]
    if not changed:
        return []
    differences = config_differences(saved, current)
    if explicit and all(key.startswith("system.") and key != "system.name" for key in changed):
        return differences
    hint = "" if explicit else " (an explicit logger.resume=<run folder> accepts changed system.* hyperparameters)"
    raise CheckpointError(f"cannot resume from {where}: its config differs from this run's "
                          f"({'; '.join(differences)}){hint}")


def restore_run(point: tuple[str, int], target: Any, system: System, settings: Settings,
                say: Callable[[str], None] = print) -> tuple[Any, HostRecord]:
    """Learner state (re-sharded like ``target``) and host record of checkpoint ``point``."""
    directory, step = point
    where = checkpointing.step_path(directory, step)
    meta = checkpointing.read_meta(directory, step)
    try:
        saved = saved_training_config(meta, type(settings.system))
    except ConfigError as err:
        raise CheckpointError(f"cannot resume from {where}: its config is not valid for this code ({err})") from err
    changed = check_resume_config(saved, training_config(config_dict(settings), settings.num_devices),
                                  explicit=isinstance(settings.logger.resume, str), where=where)
    if changed:
        say(f"warning: resuming with changed hyperparameters ({'; '.join(changed)}); from here on the run "
            "differs from the one that wrote the checkpoint")
    params = stacked_eval_params(system, target)
    host_target = {"best_params": jax.device_get(params), "best_return": np.zeros(settings.num_runs, np.float64),
                   "params": params}
    state, host, meta = checkpointing.restore(directory, step, target, host_target)
    evaluations = [Evaluation.from_json(e) for e in meta["evaluations"]]
    record = HostRecord(evaluations, np.asarray(host["best_return"]), host["best_params"], float(meta["train_seconds"]))
    return state, record
