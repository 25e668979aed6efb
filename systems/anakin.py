"""The anakin driver shared by every system: one compiled update chunk, a host loop over chunks.

``update_chunk = jit(shard_map(scan(num_updates_per_eval) ∘ vmap(seeds)))`` over a 1-D mesh of all
devices. Learner states carry a leading seed axis S; env-batched fields (``System.env_fields``) are
sharded over devices along the env axis, everything else is replicated (gradients are averaged
across devices, so replicas stay identical).

The host loop (``run``), Mava's evaluation protocol with two corrections (the parameters after each
update chunk are evaluated, and once more before training):

    evaluate the initial parameters
    repeat num_evaluation times:
        run one update chunk; stop if a loss or a parameter is not finite
        evaluate on separate eval envs (num_eval_episodes per seed); keep the best parameters
        log (console, marl-eval JSON, Neptune); checkpoint every logger.checkpoint.interval
    absolute metric: the best parameters on num_absolute_metric_eval_episodes (default 10x)
    learning-curve plot

Checkpoints hold the learner state and the host loop's record (evaluations so far, best
parameters), so ``logger.resume`` continues a killed run exactly where its last checkpoint was:
on the same devices its final parameters equal an uninterrupted run's bit for bit.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array
from jax.sharding import NamedSharding, PartitionSpec as P

import envs
from envs.types import EnvSpec, MarlEnv
from envs.vector import AutoResetVecEnv
from systems.contract import System, SystemBuilder, needs_global_state, stacked_eval_params, train_summary
from systems.evaluation import EvalResult, make_evaluator
from systems.resume import Evaluation, HostRecord, find_resume_point, restore_run, save_checkpoint
from systems.settings import ArchConfig, Settings, config_dict, load_settings
from systems.sweep import best_summary, ranking, run_values, with_values
from utils import checkpointing
from utils.checkpointing import CheckpointError, entry_point
from utils.config import ConfigError, section, to_container
from utils.devices import (DEVICE_AXIS, SEED_AXIS, device_note, enable_compilation_cache, initialize_distributed,
                           make_mesh, same_on_every_process, to_host, use_every_core)
from utils.logging import Console, MarlEvalJson, plot_learning_curve
from utils.neptune_logger import NeptuneLogger, NeptuneMissingError, start_neptune

EVAL_KEY_OFFSET = 10_000  # eval keys: PRNGKey(arch.seed + EVAL_KEY_OFFSET), folded with the eval index
ABSOLUTE_INDEX = 1_000_000  # eval index used for the absolute-metric keys


class NonFiniteError(RuntimeError):
    """A loss or a parameter became NaN/inf; the message names the step and the last good checkpoint."""


class Setup(NamedTuple):
    """What a run is built from before any state exists."""

    mesh: Any
    env: MarlEnv
    eval_env: MarlEnv
    vec_env: AutoResetVecEnv
    system: System
    rebuild: Callable[[Any], System]  # the system around another system config (a sweep's traced values)


@dataclasses.dataclass
class RunResult:
    """What ``run`` returns (and tests inspect)."""

    settings: Settings
    learner_state: Any  # final state, leading seed axis
    eval_steps: np.ndarray  # (num_evals + 1,) env steps at each evaluation (0 = before training)
    eval_returns: np.ndarray  # (num_evals + 1, S) mean evaluation return per seed
    eval_win_rates: Optional[np.ndarray]  # (num_evals + 1, S) or None
    absolute_return: Optional[np.ndarray]  # (S,)
    absolute_win_rate: Optional[np.ndarray]  # (S,) or None
    train_metrics: list[dict[str, np.ndarray]]  # per chunk run by this process: name -> (U, S)
    compile_seconds: float
    train_seconds: float  # chunks only, compile excluded (earlier sessions of a resumed run included)
    run_dir: str
    checkpoint_dir: Optional[str] = None
    resumed_from: Optional[int] = None  # the checkpoint (evaluation index) this run continued from


# ----------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------
def make_envs(settings: Settings) -> tuple[MarlEnv, MarlEnv]:
    """Train and eval envs (the eval env is a separate instance; neither auto-resets by itself)."""
    global_state = needs_global_state(settings.system)
    kwargs = dict(settings.env.kwargs)
    try:
        train = envs.make(settings.env.name, settings.env.task, global_state=global_state, **kwargs)
    except (TypeError, ValueError) as err:  # a keyword the env does not take, or a bad value
        raise ConfigError(f"env.kwargs={kwargs} for env.name={settings.env.name!r}: {err}") from None
    evaluation = envs.make(settings.env.name, settings.env.task, global_state=global_state, **kwargs)
    return train, evaluation


def prepare(settings: Settings, build_system: SystemBuilder) -> Setup:
    """Mesh, envs and the system for ``settings``."""
    mesh = make_mesh(settings.num_devices)
    env, eval_env = make_envs(settings)
    vec_env = AutoResetVecEnv(env, settings.envs_per_device, settings.arch.num_resets)

    def rebuild(system_config: Any) -> System:
        return build_system(dataclasses.replace(settings, system=system_config), env.spec, vec_env)

    return Setup(mesh, env, eval_env, vec_env, build_system(settings, env.spec, vec_env), rebuild)


def state_specs(state: Any, env_fields: tuple[str, ...]) -> Any:
    """PartitionSpecs: env-batched fields split over devices on axis 1 (after seeds); rest replicated."""
    specs = {}
    for name in state._fields:
        spec = P(None, DEVICE_AXIS) if name in env_fields else P()
        specs[name] = jax.tree.map(lambda _: spec, getattr(state, name))
    return type(state)(**specs)


def init_learner_states(system: System, env: MarlEnv, settings: Settings) -> Any:
    """Per-run learner states (leading axis S = ``settings.num_runs``); seed s uses PRNGKey(arch.seed + s),
    in every combination of a sweep."""
    seeds = jnp.asarray(settings.run_seeds)

    def init_one(seed: Array) -> Any:
        key, env_key = jax.random.split(jax.random.PRNGKey(seed))
        vec = AutoResetVecEnv(env, settings.arch.num_envs)
        env_state, timestep = vec.reset(env_key)
        return system.init(key, env_state, timestep)

    return jax.jit(jax.vmap(init_one))(seeds)


def shard_state(state: Any, mesh: Any, env_fields: tuple[str, ...]) -> Any:
    specs = state_specs(state, env_fields)
    return jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), state, specs)


def initial_state(setup: Setup, settings: Settings) -> Any:
    """Fresh learner states, sharded over the mesh (also the target a checkpoint is restored onto)."""
    state = init_learner_states(setup.system, setup.env, settings)
    return shard_state(state, setup.mesh, setup.system.env_fields)


def make_update_chunk(system: System, settings: Settings, mesh: Any, example_state: Any,
                      rebuild: Optional[Callable[[Any], System]] = None) -> Callable:
    """jit(shard_map(scan over updates of vmap over seeds)): ``state -> (state, metrics)``. Donates the
    input state.

    With a sweep (``settings.sweep``) the chunk is ``(state, values) -> (state, metrics)``: ``values``
    holds each swept key's value per run (``systems.sweep.run_values``), vmapped with the state, and
    every update runs the system that ``rebuild`` makes around the config holding those traced values.
    """

    def swept_step(state: Any, values: dict[str, Array]) -> tuple[Any, dict[str, Array]]:
        return rebuild(with_values(settings.system, values)).update_step(state)

    def chunk(state: Any, values: Optional[dict[str, Array]] = None) -> tuple[Any, dict[str, Array]]:
        def one_update(state: Any, _: None) -> tuple[Any, dict[str, Array]]:
            if values is None:
                return jax.vmap(system.update_step, axis_name=SEED_AXIS)(state)
            return jax.vmap(swept_step, axis_name=SEED_AXIS)(state, values)

        return jax.lax.scan(one_update, state, None, length=settings.num_updates_per_eval)

    if settings.sweep and rebuild is None:
        raise ValueError("a sweep's update chunk needs rebuild: the system around a config with traced values")
    specs = state_specs(example_state, system.env_fields)
    in_specs = (specs, P()) if settings.sweep else (specs,)
    # check_vma=False: third-party env code (jumanji) scans with constant carries that vma typing
    # rejects. Replicated outputs stay identical because every gradient is pmean-ed (tested).
    sharded = jax.shard_map(chunk, mesh=mesh, in_specs=in_specs, out_specs=(specs, P()), check_vma=False)
    return jax.jit(sharded, donate_argnums=0)


def compile_update_chunk(system: System, settings: Settings, mesh: Any, state: Any,
                         rebuild: Optional[Callable[[Any], System]] = None) -> tuple[Callable, float]:
    """The compiled chunk ``state -> (state, metrics (U, S))`` and the seconds compiling took (a
    sweep's values are bound as the chunk's second argument: arrays, not constants)."""
    start = time.perf_counter()
    chunk = make_update_chunk(system, settings, mesh, state, rebuild)
    if not settings.sweep:
        return chunk.lower(state).compile(), time.perf_counter() - start
    values = jax.device_put(run_values(settings.sweep, settings.system, settings.arch.num_seeds), NamedSharding(mesh, P()))
    compiled = chunk.lower(state, values).compile()
    return (lambda state: compiled(state, values)), time.perf_counter() - start


def summarise_eval(result: EvalResult, has_win: bool) -> dict[str, np.ndarray]:
    """Per-seed means: mean_episode_return (S,), win_rate (S,) in percent where the env has wins."""
    out = {"mean_episode_return": np.asarray(result.episode_return).mean(axis=-1),
           "mean_episode_length": np.asarray(result.episode_length).mean(axis=-1)}
    if has_win:
        out["win_rate"] = 100.0 * np.asarray(result.won_episode).mean(axis=-1)
    return out


def make_evaluate(setup: Setup, settings: Settings) -> Callable[..., dict[str, np.ndarray]]:
    """``evaluate(params (S, ...), index, episodes=num_eval_episodes) -> per-seed metrics``.

    Episode counts that are multiples of ``num_eval_episodes`` run the one compiled evaluator
    repeatedly (the absolute metric's 10x costs no second compilation). Keys depend only on
    ``arch.seed``, ``index`` and the repeat, so an evaluation is reproducible (and resumable).
    """
    arch, system = settings.arch, setup.system
    batch = arch.num_eval_episodes
    programs: dict[int, Callable] = {}
    base_key = jax.random.PRNGKey(arch.seed + EVAL_KEY_OFFSET)

    def program(episodes: int) -> Callable:
        if episodes not in programs:
            programs[episodes] = make_evaluator(system.act, system.init_actor_state, setup.eval_env,
                                                setup.mesh, episodes, arch.evaluation_greedy)
        return programs[episodes]

    def evaluate(params: Any, index: int, episodes: Optional[int] = None) -> dict[str, np.ndarray]:
        episodes = episodes or batch
        size = batch if episodes % batch == 0 else episodes
        parts = []
        for repeat in range(episodes // size):
            key = jax.random.fold_in(jax.random.fold_in(base_key, index), repeat)
            keys = jnp.tile(jax.random.split(key, arch.num_seeds), (settings.sweep.size, 1))  # seed s: one key
            parts.append(to_host(program(size)(params, keys)))
        merged = EvalResult(*(np.concatenate([getattr(p, f) for p in parts], axis=-1) for f in EvalResult._fields))
        return summarise_eval(merged, setup.env.spec.has_win)

    return evaluate


# ----------------------------------------------------------------------------------------------
# Host-loop bookkeeping (pure functions on host arrays)
# ----------------------------------------------------------------------------------------------
def improve_best(record: HostRecord, params: Any, returns: np.ndarray) -> HostRecord:
    """Keeps, per seed, the parameters with the best evaluation return (ties: the later ones)."""
    improved = returns >= record.best_return
    if not improved.any():
        return record
    host = jax.device_get(params)

    def pick(new: np.ndarray, old: np.ndarray) -> np.ndarray:
        mask = improved.reshape((-1,) + (1,) * (np.ndim(new) - 1))
        return np.where(mask, new, old)

    return dataclasses.replace(record, best_params=jax.tree.map(pick, host, record.best_params),
                               best_return=np.where(improved, returns, record.best_return))


def non_finite(metrics: dict[str, np.ndarray], params: Any) -> Optional[tuple[int, list[int], list[str]]]:
    """The first update of a chunk with a NaN/inf loss, or a non-finite parameter after it.

    ``metrics``: name -> (U, S, ...) per update and seed. Returns (update index within the chunk,
    seed indices, names) or None when everything is finite.
    """
    bad: dict[str, np.ndarray] = {}
    for name, value in metrics.items():
        value = np.asarray(value)
        if np.issubdtype(value.dtype, np.floating) and value.ndim >= 2:
            flags = ~np.isfinite(value.reshape(value.shape[0], value.shape[1], -1)).all(axis=-1)
            if flags.any():
                bad[name] = flags  # (U, S)
    params_ok = np.ones((), bool)
    for leaf in jax.tree.leaves(jax.device_get(params)):
        leaf = np.asarray(leaf)
        if np.issubdtype(leaf.dtype, np.floating):
            params_ok = params_ok & np.isfinite(leaf.reshape(leaf.shape[0], -1)).all(axis=-1)
    if not bad and np.all(params_ok):
        return None
    if bad:
        any_bad = np.any(np.stack(list(bad.values())), axis=0)  # (U, S)
        update = int(np.argmax(any_bad.any(axis=1)))
        seeds = np.nonzero(any_bad[update])[0].tolist()
        names = [name for name, flags in bad.items() if flags[update].any()]
    else:
        update = next(iter(metrics.values())).shape[0] - 1
        seeds = np.nonzero(~np.broadcast_to(params_ok, (np.size(params_ok),)))[0].tolist()
        names = []
    if not np.all(params_ok):
        names.append("parameters")
    return update, seeds, names


# ----------------------------------------------------------------------------------------------
# Output fan-out: console, marl-eval JSON, Neptune
# ----------------------------------------------------------------------------------------------
class Reporter:
    """Sends each evaluation to the console, the marl-eval JSON (written every time) and Neptune."""

    def __init__(self, settings: Settings, console: Console, say: Callable[[str], None],
                 results: MarlEvalJson, neptune: NeptuneLogger, primary: bool,
                 console_metrics: tuple[tuple[str, str], ...] = ()):
        self.settings, self.console, self.say = settings, console, say
        self.results, self.neptune, self.primary = results, neptune, primary
        self.console_metrics = console_metrics

    def restore(self, evaluations: list[Evaluation]) -> None:
        """Re-enters the evaluations of the run so far (a resumed run rewrites its JSON entries)."""
        for evaluation in evaluations[1:]:
            self.results.add(evaluation.index - 1, evaluation.step, evaluation.metrics, evaluation.elapsed)

    def initial(self, evaluation: Evaluation) -> None:
        self.say(f"before training: eval return {np.mean(evaluation.metrics['mean_episode_return']):.3f}")
        self._neptune(evaluation, {})

    def evaluation(self, evaluation: Evaluation, train: dict[str, float]) -> None:
        self.results.add(evaluation.index - 1, evaluation.step, evaluation.metrics, evaluation.elapsed)
        if self.primary:
            self.results.write()
        self._neptune(evaluation, train)
        metrics = evaluation.metrics
        ret = metrics["mean_episode_return"]
        spread = f" ±{np.std(ret):.3f}" if ret.size > 1 else ""
        win = f"  win {np.mean(metrics['win_rate']):5.1f}%" if "win_rate" in metrics else ""
        sps = float(np.mean(metrics["steps_per_second"]))
        own = "".join(f"  {label} {train[name]:.2f}" for label, name in self.console_metrics if name in train)
        summary = (f"step {evaluation.step:>11,}  eval return {np.mean(ret):8.3f}{spread}{win}  "
                   f"train return {train.get('episode_return', float('nan')):8.3f}{own}  {sps:10,.0f} steps/s")
        best = best_summary(ranking(self.settings.sweep, self.settings.arch.num_seeds, ret)) if self.settings.sweep else ""
        self.console.evaluation(evaluation.index, evaluation.step, summary,
                                f"return {np.mean(ret):.3f}{win}  {sps:,.0f} steps/s", best)

    def absolute(self, metrics: dict[str, np.ndarray], episodes: int) -> None:
        self.results.add_absolute(metrics)
        win = f", win {np.mean(metrics['win_rate']):.1f}%" if "win_rate" in metrics else ""
        self.say(f"absolute metric (best parameters, {episodes} episodes per seed): "
                 f"return {np.mean(metrics['mean_episode_return']):.3f}{win}")
        if self.settings.sweep:
            rows = ranking(self.settings.sweep, self.settings.arch.num_seeds, metrics["mean_episode_return"])
            width = max(len(label) for label, _, _ in rows)
            self.say("absolute metric per combination, best first (mean ± std over seeds):")
            for label, mean, std in rows:
                spread = f" ±{std:.3f}" if self.settings.arch.num_seeds > 1 else ""
                self.say(f"  {label:<{width}}  {mean:8.3f}{spread}")
        self.neptune.set_values("absolute", {name: float(np.mean(v)) for name, v in metrics.items()})

    def _neptune(self, evaluation: Evaluation, train: dict[str, float]) -> None:
        if not self.neptune.enabled:
            return
        means = {name: float(np.mean(v)) for name, v in evaluation.metrics.items()}
        self.neptune.log_metrics("eval", means, evaluation.step)
        labels = self.settings.run_combinations
        for i, (value, seed) in enumerate(zip(evaluation.metrics["mean_episode_return"], self.settings.run_seeds)):
            self.neptune.log_metrics(f"eval/{labels[i] + '/' if labels[i] else ''}seed_{seed}",
                                     {"mean_episode_return": float(value)}, evaluation.step)
        if train:
            self.neptune.log_metrics("train", train, evaluation.step)


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------
def sweep_note(settings: Settings) -> str:
    """`` x 4 combinations of actor_lr (12 runs in one program)`` in a sweep; else empty."""
    sweep = settings.sweep
    if not sweep:
        return ""
    return (f" x {sweep.size} combination(s) of {', '.join(sweep.keys)} "
            f"({settings.num_runs} runs in one program)")


def default_run_dir(settings: Settings) -> str:
    return os.path.join(settings.logger.base_dir, f"{settings.system.name}_{settings.env.name}_{settings.env.task}"
                        f"_s{settings.arch.seed}_{time.strftime('%Y%m%d-%H%M%S')}")


class Outputs(NamedTuple):
    """Where a run writes: its folder, the marl-eval JSON, Neptune, checkpoints, the console."""

    run_dir: str
    results: MarlEvalJson
    neptune: NeptuneLogger
    reporter: "Reporter"
    checkpointer: Optional[checkpointing.Checkpointer]
    checkpoint_dir: Optional[str]
    meta: dict[str, Any]  # the checkpoints' static meta


def open_outputs(settings: Settings, build_system: SystemBuilder, run_dir: str, console: Console,
                 system_console: tuple[tuple[str, str], ...] = ()) -> Outputs:
    arch, logcfg, say = settings.arch, settings.logger, console.print
    primary = jax.process_index() == 0
    os.makedirs(run_dir, exist_ok=True)
    seeds = settings.run_seeds
    results = MarlEvalJson(logcfg.json_path or os.path.join(run_dir, "metrics.json"),
                           settings.env.name, settings.env.task, settings.run_labels, seeds)
    neptune = start_neptune(logcfg.neptune, os.path.basename(os.path.normpath(run_dir)), config_dict(settings),
                            warn=lambda text: say(f"warning: {text}"), say=say) if primary else NeptuneLogger(None, "off", say)
    checkpoint_dir = os.path.join(run_dir, "checkpoints") if logcfg.checkpoint.enabled else None
    checkpointer = (checkpointing.Checkpointer(checkpoint_dir, logcfg.checkpoint.max_to_keep, logcfg.checkpoint.keep_best)
                    if checkpoint_dir else None)
    meta = {"config": config_dict(settings), "num_devices": settings.num_devices,
            "system_config": entry_point(type(settings.system)), "build_system": entry_point(build_system),
            "seeds": seeds, "num_evaluation": arch.num_evaluation,
            **({"runs": settings.run_labels} if settings.sweep else {})}
    reporter = Reporter(settings, console, say, results, neptune, primary, system_console)
    return Outputs(run_dir, results, neptune, reporter,
                   checkpointer, checkpoint_dir, meta)


def start_state(setup: Setup, settings: Settings, resume_point: Optional[tuple[str, int]],
                out: Outputs, say: Callable[[str], None]) -> tuple[Any, Optional[HostRecord], Optional[str]]:
    """Fresh learner states, or those of the checkpoint to resume (restored onto the fresh shapes and
    shardings) with its host record and path."""
    state = initial_state(setup, settings)
    if resume_point is None:
        return state, None, None
    state, record = restore_run(resume_point, state, setup.system, settings, say)
    last_checkpoint = checkpointing.step_path(*resume_point)
    out.reporter.restore(record.evaluations)
    say(f"resuming from {last_checkpoint} (evaluation {record.chunks_done}/{settings.arch.num_evaluation}, "
        f"step {record.evaluations[-1].step:,})")
    return state, record, last_checkpoint


def train_chunk(state: Any, record: HostRecord, index: int, chunk: Callable, evaluate: Callable, setup: Setup,
                settings: Settings, out: Outputs, last_checkpoint: Optional[str]) -> tuple[Any, HostRecord, Any, Optional[str]]:
    """One update chunk, its evaluation, logging and checkpoint: (state, record, metrics, last checkpoint)."""
    arch, system = settings.arch, setup.system
    start = time.perf_counter()
    state, metrics = chunk(state)
    metrics = to_host(metrics)
    elapsed = time.perf_counter() - start
    params = stacked_eval_params(system, state)
    problem = non_finite(metrics, getattr(state, "params", params))
    if problem is not None:
        raise NonFiniteError(non_finite_message(problem, index, settings, last_checkpoint, out.results.path))
    step = index * settings.steps_per_chunk
    evaluation = Evaluation(index, step, record.train_seconds + elapsed, evaluate(params, index))
    runs = settings.num_runs
    evaluation.metrics["steps_per_second"] = np.full(runs, settings.steps_per_chunk * runs / elapsed)
    record = improve_best(record, params, evaluation.metrics["mean_episode_return"])
    record = dataclasses.replace(record, evaluations=record.evaluations + [evaluation], train_seconds=evaluation.elapsed)
    out.reporter.evaluation(evaluation, train_summary(metrics))
    interval = settings.logger.checkpoint.interval
    if out.checkpointer is not None and (index % interval == 0 or index == arch.num_evaluation):
        last_checkpoint = save_checkpoint(out.checkpointer, index, state, params, record, out.meta)
    return state, record, metrics, last_checkpoint


def finish(record: HostRecord, evaluate: Callable, setup: Setup, settings: Settings, out: Outputs,
           compile_seconds: float) -> tuple[Optional[dict[str, np.ndarray]], np.ndarray, np.ndarray, Optional[np.ndarray]]:
    """Absolute metric, JSON, plot: (absolute metrics, eval steps, returns (E+1, S), win rates)."""
    arch, primary, say = settings.arch, jax.process_index() == 0, out.reporter.say
    absolute = None
    if arch.absolute_metric:
        episodes = arch.num_absolute_metric_eval_episodes
        best = jax.device_put(record.best_params, NamedSharding(setup.mesh, P()))
        absolute = evaluate(best, ABSOLUTE_INDEX, episodes)
        out.reporter.absolute(absolute, episodes)
    if primary:
        out.results.write()
    out.reporter.console.close()
    steps = np.asarray([e.step for e in record.evaluations])
    returns = np.stack([e.metrics["mean_episode_return"] for e in record.evaluations])
    wins = np.stack([e.metrics["win_rate"] for e in record.evaluations]) if setup.env.spec.has_win else None
    if settings.logger.plot and primary:
        plot_path = os.path.join(out.run_dir, "learning_curve.png")
        plot_learning_curve(plot_path, steps, returns, f"{settings.system.name} {settings.env.name}/{settings.env.task}",
                            wins, None if absolute is None else absolute["mean_episode_return"],
                            settings.run_combinations if settings.sweep else None)
        out.neptune.upload("results/learning_curve", plot_path)
    out.neptune.upload("results/metrics_json", out.results.path)
    say(f"trained {settings.total_steps * settings.num_runs:,} steps in {record.train_seconds:.1f}s "
        f"(+{compile_seconds:.1f}s compile); results in {out.run_dir}")
    return absolute, steps, returns, wins


def run(
    settings: Settings,
    build_system: SystemBuilder,
    run_dir: Optional[str] = None,
    log: Optional[Callable[[str], None]] = None,
) -> RunResult:
    """Trains ``settings.arch.num_seeds`` seeds of a system and evaluates them (Mava's protocol)."""
    arch = settings.arch
    if log is None and jax.process_index() != 0:  # one console per multi-host run: process 0's
        log = lambda text: None  # noqa: E731
    console = Console(settings.total_steps, arch.num_evaluation, settings.logger.progress, settings.logger.log_every,
                      sink=log)
    say = console.print
    setup = prepare(settings, build_system)
    if run_dir is not None:  # e.g. Hydra's folder, named from each process's clock
        run_dir = same_on_every_process(run_dir)
    resume_point = find_resume_point(settings, run_dir, say)
    if resume_point is not None:
        run_dir = os.path.dirname(resume_point[0])  # a resumed run keeps writing its own folder
    out = open_outputs(settings, build_system, run_dir or same_on_every_process(default_run_dir(settings)), console,
                       setup.system.console_metrics)
    try:
        say(f"{settings.system.name} on {settings.env.name}/{settings.env.task}: {arch.num_seeds} seed(s)"
            f"{sweep_note(settings)}, "
            f"{settings.num_devices} device(s){device_note(settings.num_devices)}, {arch.num_envs} envs, "
            f"{settings.num_updates_per_eval * arch.num_evaluation} updates; compiling...")
        state, record, last_checkpoint = start_state(setup, settings, resume_point, out, say)
        chunk, compile_seconds = compile_update_chunk(setup.system, settings, setup.mesh, state, setup.rebuild)
        evaluate = make_evaluate(setup, settings)
        say(f"compiled in {compile_seconds:.1f}s; run folder {out.run_dir}")
        if record is None:
            params = stacked_eval_params(setup.system, state)
            first = Evaluation(0, 0, 0.0, evaluate(params, 0))
            record = HostRecord([first], first.metrics["mean_episode_return"].copy(), jax.device_get(params))
            out.reporter.initial(first)
        train_metrics: list[dict[str, np.ndarray]] = []
        console.start(record.evaluations[-1].step)
        for index in range(record.chunks_done + 1, arch.num_evaluation + 1):
            state, record, metrics, last_checkpoint = train_chunk(state, record, index, chunk, evaluate, setup,
                                                                  settings, out, last_checkpoint)
            train_metrics.append(metrics)
        absolute, steps, returns, wins = finish(record, evaluate, setup, settings, out, compile_seconds)
        if setup.system.report is not None and jax.process_index() == 0 and settings.logger.plot:
            setup.system.report(out.run_dir, train_metrics)
    finally:
        console.close()
        out.neptune.close()
        if out.checkpointer is not None:
            out.checkpointer.close()
    return RunResult(
        settings=settings, learner_state=state, eval_steps=steps, eval_returns=returns, eval_win_rates=wins,
        absolute_return=None if absolute is None else absolute["mean_episode_return"],
        absolute_win_rate=None if absolute is None else absolute.get("win_rate"),
        train_metrics=train_metrics, compile_seconds=compile_seconds, train_seconds=record.train_seconds,
        run_dir=out.run_dir, checkpoint_dir=out.checkpoint_dir,
        resumed_from=None if resume_point is None else resume_point[1],
    )


def non_finite_message(problem: tuple[int, list[int], list[str]], index: int, settings: Settings,
                       last_checkpoint: Optional[str], results_path: str) -> str:
    update, seeds, names = problem
    global_update = (index - 1) * settings.num_updates_per_eval + update + 1
    step = global_update * settings.steps_per_update
    seed_ids = [settings.arch.seed + s for s in seeds]
    if last_checkpoint:
        where = (f"The last good checkpoint is {last_checkpoint}; continue from it with a change that avoids "
                 f"this, e.g. a lower system.actor_lr: logger.resume={os.path.dirname(os.path.dirname(last_checkpoint))}"
                 " system.actor_lr=... (an explicit resume accepts changed system.* hyperparameters).")
    else:
        where = "No checkpoint was saved before this point."
    saved = f" Evaluations so far are in {results_path}." if os.path.exists(results_path) else ""
    return (f"non-finite {', '.join(names) or 'values'} at update {global_update} (env step {step:,}) "
            f"of seed(s) {seed_ids}: training stopped. {where}{saved}")


def run_from_config(cfg: Any, system_cls: type, build_system: SystemBuilder) -> float:
    """Hydra entry: validate, train, return the final mean eval return (a sweep objective).

    Errors a user can act on (config, checkpoint, NaN, missing Neptune) end the process with their
    message instead of a traceback.
    """
    try:
        prepare_process(cfg)
        settings = load_settings(cfg, system_cls)
        result = run(settings, build_system, run_dir=_hydra_run_dir())
    except (ConfigError, CheckpointError, NonFiniteError, NeptuneMissingError) as err:
        raise SystemExit(f"error: {err}") from None
    return float(np.mean(result.eval_returns[-1]))


def prepare_process(cfg: Any) -> None:
    """What must happen before jax creates its devices: one CPU device per core unless the user
    chose a count (``utils.devices.use_every_core``; a multi-host run leaves each process's devices
    to XLA_FLAGS), the persistent compilation cache, and joining a multi-host run."""
    arch = section(ArchConfig, to_container(cfg).get("arch"), "arch")
    use_every_core(arch.num_devices is not None or arch.distributed, arch.sizes())
    enable_compilation_cache(arch.compilation_cache)
    if arch.distributed:
        try:
            initialize_distributed(arch.coordinator_address, arch.num_processes, arch.process_id)
        except ValueError as err:
            raise ConfigError(str(err)) from None


def _hydra_run_dir() -> Optional[str]:
    try:
        from hydra.core.hydra_config import HydraConfig

        return HydraConfig.get().runtime.output_dir
    except Exception:  # not under hydra
        return None
