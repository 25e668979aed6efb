"""Run settings shared by every system: ``arch``, ``env``, ``network`` and ``logger`` sections.

``load_settings(cfg, SystemConfig)`` validates the whole Hydra config and derives the numbers the
driver needs (updates, chunk sizes, per-device envs) once, before anything is compiled.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Optional, Union

import envs
from systems.sweep import Sweep, combination_label, parse_sweep, run_combinations
from utils.config import ConfigError, fail, one_of, positive, require, section, to_container


@dataclasses.dataclass(frozen=True)
class ArchConfig:
    seed: int = 42
    num_seeds: int = 1  # independent runs trained in one program (a vmapped axis)
    num_envs: int = 32  # training envs per seed, over all devices
    total_timesteps: int = 2_000_000  # joint env steps per seed
    num_evaluation: int = 20  # evaluations during training (one compiled chunk between each)
    num_eval_episodes: int = 32
    num_absolute_metric_eval_episodes: Optional[int] = None  # None: 10 x num_eval_episodes (Mava: 320)
    absolute_metric: bool = True
    evaluation_greedy: bool = False
    num_devices: Optional[int] = None  # None: every device jax sees
    distributed: bool = False  # multi-host: jax.distributed.initialize() before jax starts (utils.devices)
    coordinator_address: Optional[str] = None  # host:port of process 0; None: JAX_COORDINATOR_ADDRESS or the cluster's
    num_processes: Optional[int] = None  # None: JAX_NUM_PROCESSES or the cluster's (SLURM, Open MPI, TPU pod, k8s)
    process_id: Optional[int] = None  # this process, 0..num_processes-1; None: JAX_PROCESS_ID or the cluster's
    num_resets: Optional[int] = None  # fresh starts computed per step; None: num_envs/16 per device
    compilation_cache: Union[bool, str] = "auto"  # auto: a per-user folder | off | a folder path

    def check(self, prefix: str) -> None:
        for key in ("num_seeds", "num_envs", "total_timesteps", "num_evaluation", "num_eval_episodes"):
            positive(f"{prefix}.{key}", getattr(self, key))
        if self.num_absolute_metric_eval_episodes is not None:
            positive(f"{prefix}.num_absolute_metric_eval_episodes", self.num_absolute_metric_eval_episodes)
        if self.num_devices is not None:
            positive(f"{prefix}.num_devices", self.num_devices)
        if self.num_resets is not None:
            positive(f"{prefix}.num_resets", self.num_resets)
        if self.num_processes is not None:
            positive(f"{prefix}.num_processes", self.num_processes)
        if self.process_id is not None:
            limit = f"0..{self.num_processes - 1}" if self.num_processes else "0 or more"
            require(self.process_id >= 0 and (self.num_processes is None or self.process_id < self.num_processes),
                    f"{prefix}.process_id", self.process_id, f"must be in {limit} (arch.num_processes={self.num_processes})")
        for key in ("coordinator_address", "num_processes", "process_id"):
            require(self.distributed or getattr(self, key) is None, f"{prefix}.{key}", getattr(self, key),
                    "applies to multi-host runs only: add arch.distributed=true")
        require(self.compilation_cache is not True and bool(str(self.compilation_cache).strip()),
                f"{prefix}.compilation_cache", self.compilation_cache, "must be auto, off (or false) or a folder path")

    @property
    def absolute_episodes(self) -> int:
        """Episodes of the absolute metric: ``num_absolute_metric_eval_episodes`` or 10 x ``num_eval_episodes``."""
        return self.num_absolute_metric_eval_episodes or 10 * self.num_eval_episodes

    def sizes(self) -> tuple[int, ...]:
        """What every device count must divide: envs and both evaluation episode counts."""
        return self.num_envs, self.num_eval_episodes, self.absolute_episodes


@dataclasses.dataclass(frozen=True)
class EnvConfig:
    name: str = "lbf"
    task: str = "8x8-2p-2f-coop"
    kwargs: dict = dataclasses.field(default_factory=dict)

    def check(self, prefix: str) -> None:
        one_of(f"{prefix}.name", self.name, sorted(envs.FAMILIES))


@dataclasses.dataclass(frozen=True)
class NetworkConfig:
    kind: str = "ff"
    actor_layers: tuple[int, ...] = (128, 128)
    critic_layers: tuple[int, ...] = (128, 128)
    activation: str = "relu"
    use_layer_norm: bool = False
    parameter_sharing: str = "shared"
    add_agent_id: bool = True
    # kind=rnn (every PPO-family system): pre-torso -> GRU -> post-torso, for the actor and the critic
    rnn_pre_layers: tuple[int, ...] = (128,)
    rnn_hidden_size: int = 128
    rnn_post_layers: tuple[int, ...] = (128,)

    def check(self, prefix: str) -> None:
        one_of(f"{prefix}.kind", self.kind, ["ff", "rnn"])
        positive(f"{prefix}.rnn_hidden_size", self.rnn_hidden_size)
        for key in ("rnn_pre_layers", "rnn_post_layers"):
            sizes = getattr(self, key)
            require(len(sizes) > 0 and all(s > 0 for s in sizes), f"{prefix}.{key}", list(sizes),
                    "must be a non-empty list of positive layer widths")
        one_of(f"{prefix}.activation", self.activation, ["relu", "tanh", "gelu"])
        one_of(f"{prefix}.parameter_sharing", self.parameter_sharing, ["shared", "separate"])
        for key in ("actor_layers", "critic_layers"):
            sizes = getattr(self, key)
            require(len(sizes) > 0 and all(s > 0 for s in sizes), f"{prefix}.{key}", list(sizes),
                    "must be a non-empty list of positive layer widths")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """``logger.checkpoint.*``: Orbax checkpoints of the full learner state under <run dir>/checkpoints."""

    enabled: bool = True
    interval: int = 1  # save after every N-th evaluation (and always after the last one)
    max_to_keep: int = 2  # the most recent checkpoints kept
    keep_best: bool = True  # also keep the checkpoint with the best mean evaluation return

    def check(self, prefix: str) -> None:
        positive(f"{prefix}.interval", self.interval)
        positive(f"{prefix}.max_to_keep", self.max_to_keep)


NEPTUNE_MODES = ("auto", "async", "sync", "offline", "debug")


@dataclasses.dataclass(frozen=True)
class NeptuneConfig:
    """``logger.neptune.*``: optional Neptune logging (``pip install -e '.[neptune]'``).

    The API token is read only from the NEPTUNE_API_TOKEN environment variable, never from config.
    """

    enabled: bool = False
    project: Optional[str] = None  # "workspace/project"; None: the NEPTUNE_PROJECT variable
    mode: str = "auto"  # auto: async with a token and a reachable server, else offline
    tags: tuple[str, ...] = ()
    name: Optional[str] = None  # run name shown in Neptune; None: the run folder's name
    connect_timeout: float = 5.0  # seconds to wait for the server before going offline

    def check(self, prefix: str) -> None:
        one_of(f"{prefix}.mode", self.mode, NEPTUNE_MODES)
        positive(f"{prefix}.connect_timeout", self.connect_timeout)


@dataclasses.dataclass(frozen=True)
class LoggerConfig:
    base_dir: str = "results"  # run folders go under here
    json_path: Optional[str] = None  # marl-eval JSON (appended); None: <run dir>/metrics.json
    algorithm_name: Optional[str] = None  # the run's name in that JSON; None: algorithm_label(settings)
    plot: bool = True
    progress: bool = True  # live progress bar on a terminal
    log_every: Optional[int] = None  # one console line every N evaluations; None: about 20 lines a run
    resume: Union[bool, str] = False  # true: the latest matching run under base_dir; or a run folder
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    neptune: NeptuneConfig = dataclasses.field(default_factory=NeptuneConfig)

    def check(self, prefix: str) -> None:
        require(bool(self.base_dir), f"{prefix}.base_dir", self.base_dir, "must be a folder path")
        if self.algorithm_name is not None:
            require(bool(str(self.algorithm_name).strip()), f"{prefix}.algorithm_name", self.algorithm_name,
                    "must be a non-empty name (or null for <ff|rec>_<system>_<shared|separate>)")
        if self.log_every is not None:
            positive(f"{prefix}.log_every", self.log_every)
        if isinstance(self.resume, str):
            require(bool(self.resume), f"{prefix}.resume", self.resume,
                    "must be true, false or the path of a run folder (or its checkpoints folder)")


@dataclasses.dataclass(frozen=True)
class Settings:
    """Validated, frozen settings for one run plus the numbers derived from them."""

    arch: ArchConfig
    env: EnvConfig
    network: NetworkConfig
    system: Any  # the system's own frozen config (PPOConfig or a subclass)
    logger: LoggerConfig
    num_devices: int
    envs_per_device: int
    num_updates: int  # per seed
    num_updates_per_eval: int
    steps_per_update: int  # joint env steps per update per seed: rollout_length * num_envs
    sweep: Sweep = Sweep()  # in-program hyperparameter sweep (systems.sweep); empty: none

    @property
    def steps_per_chunk(self) -> int:
        return self.steps_per_update * self.num_updates_per_eval

    @property
    def total_steps(self) -> int:
        return self.steps_per_chunk * self.arch.num_evaluation

    @property
    def algorithm_label(self) -> str:
        """The run's algorithm name in the marl-eval JSON: ``logger.algorithm_name``, else
        ``<ff|rec>_<system>_<shared|separate>`` (Mava's ff/rec prefix, then the parameter sharing, so
        both variants of one system can share a JSON file and a figure). A system whose networks are
        not ``network.*`` names its kind (``network_kind``: Sable is ``rec`` whatever ``network.kind``)."""
        if self.logger.algorithm_name is not None:
            return str(self.logger.algorithm_name)
        kind = getattr(self.system, "network_kind", None) or ("rec" if self.network.kind == "rnn" else "ff")
        return f"{kind}_{self.system.name}_{self.network.parameter_sharing}"

    @property
    def num_runs(self) -> int:
        """The seed axis: combinations of the sweep x ``arch.num_seeds`` (just the seeds without one)."""
        return self.sweep.size * self.arch.num_seeds

    @property
    def run_seeds(self) -> list[int]:
        """The seed of each run: ``arch.seed + r % num_seeds``."""
        return [self.arch.seed + r % self.arch.num_seeds for r in range(self.num_runs)]

    @property
    def run_combinations(self) -> list[str]:
        """Each run's combination, ``[key=value,...]`` (empty strings without a sweep)."""
        return [combination_label(c) for c in run_combinations(self.sweep, self.arch.num_seeds)]

    @property
    def run_labels(self) -> list[str]:
        """Each run's algorithm name in the marl-eval JSON: the label, plus its combination in a sweep."""
        return [self.algorithm_label + combo for combo in self.run_combinations]


SECTIONS = ("arch", "env", "network", "system", "logger")
OPTIONAL_SECTIONS = ("sweep",)  # absent from config_dict when empty (older checkpoints stay comparable)


def load_settings(cfg: Any, system_cls: type, available_devices: Optional[int] = None) -> Settings:
    """Validates ``cfg`` (Hydra/OmegaConf or a plain dict) and derives the run's sizes."""
    raw = to_container(cfg)
    unknown = sorted(set(raw) - set(SECTIONS) - set(OPTIONAL_SECTIONS) - {"hydra"})
    if unknown:
        raise ConfigError(f"unknown top-level config keys {unknown}; valid: {list(SECTIONS + OPTIONAL_SECTIONS)}")
    arch = section(ArchConfig, raw.get("arch"), "arch")
    if arch.num_absolute_metric_eval_episodes is None:
        arch = dataclasses.replace(arch, num_absolute_metric_eval_episodes=arch.absolute_episodes)
    env = section(EnvConfig, raw.get("env"), "env")
    network = section(NetworkConfig, raw.get("network"), "network")
    system = section(system_cls, raw.get("system"), "system")
    sweep = parse_sweep(raw.get("sweep"), system_cls, raw.get("system"))
    logger = section(LoggerConfig, raw.get("logger"), "logger")
    if isinstance(logger.resume, str) and logger.resume.lower() in ("true", "false"):
        logger = dataclasses.replace(logger, resume=logger.resume.lower() == "true")
    require(logger.resume is False or logger.checkpoint.enabled, "logger.resume", logger.resume,
            "needs checkpoints: logger.checkpoint.enabled=true")

    valid_tasks = envs.tasks(env.name)
    if env.task not in valid_tasks:
        fail("env.task", env.task, f"must be a task of env.name={env.name!r}: {valid_tasks}")

    processes = 1
    if available_devices is None:
        import jax

        available_devices, processes = jax.device_count(), jax.process_count()
    num_devices = arch.num_devices or available_devices
    require(num_devices <= available_devices, "arch.num_devices", arch.num_devices,
            f"only {available_devices} devices are available")
    require(processes == 1 or num_devices == available_devices, "arch.num_devices", arch.num_devices,
            f"must be null or {available_devices} (every device of the {processes} processes) in a multi-host run")
    require(arch.num_envs % num_devices == 0, "arch.num_envs", arch.num_envs,
            f"must be divisible by the number of devices ({num_devices})")
    require(arch.num_eval_episodes % num_devices == 0, "arch.num_eval_episodes", arch.num_eval_episodes,
            f"must be divisible by the number of devices ({num_devices})")
    require(arch.num_absolute_metric_eval_episodes % num_devices == 0,
            "arch.num_absolute_metric_eval_episodes", arch.num_absolute_metric_eval_episodes,
            f"must be divisible by the number of devices ({num_devices})")
    envs_per_device = arch.num_envs // num_devices
    rollout = system.rollout_length
    samples = rollout * envs_per_device
    require(samples % system.num_minibatches == 0, "system.num_minibatches", system.num_minibatches,
            f"must divide rollout_length * envs per device = {rollout} * {envs_per_device} = {samples}")

    steps_per_update = rollout * arch.num_envs
    num_updates = arch.total_timesteps // steps_per_update
    require(num_updates >= arch.num_evaluation, "arch.total_timesteps", arch.total_timesteps,
            f"must give at least one update per evaluation: >= num_evaluation * rollout_length * "
            f"num_envs = {arch.num_evaluation * steps_per_update}")
    return Settings(
        arch=arch,
        env=env,
        network=network,
        system=system,
        logger=logger,
        num_devices=num_devices,
        envs_per_device=envs_per_device,
        num_updates=num_updates,
        num_updates_per_eval=num_updates // arch.num_evaluation,
        steps_per_update=steps_per_update,
        sweep=sweep,
    )


def config_dict(settings: Settings) -> dict[str, Any]:
    """The run's sections as plain JSON data (saved with checkpoints); ``load_settings`` takes it back."""
    config = {name: dataclasses.asdict(getattr(settings, name)) for name in SECTIONS}
    if settings.sweep:
        config["sweep"] = settings.sweep.as_config()
    return json.loads(json.dumps(config))
