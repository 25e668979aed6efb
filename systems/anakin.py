"""The anakin driver shared by every system: one compiled update chunk, a host loop over chunks.

``update_chunk = jit(shard_map(scan(num_updates_per_eval) ∘ vmap(seeds)))`` over a 1-D mesh of all
devices. Learner states carry a leading seed axis S; env-batched fields (``System.env_fields``) are
sharded over devices along the env axis, everything else is replicated (gradients are averaged
across devices, so replicas stay identical). The host loop runs a chunk, evaluates the updated
parameters, logs and repeats; then it re-evaluates the best parameters on 10x the episodes (the
absolute metric), writes the marl-eval JSON and the learning-curve plot.
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
from systems.evaluation import ActFn, EvalResult, make_evaluator
from systems.settings import Settings, load_settings
from utils.devices import DEVICE_AXIS, make_mesh, maybe_initialize_distributed
from utils.logging import Console, MarlEvalJson, plot_curve


class System(NamedTuple):
    """What an algorithm gives the driver. Everything is per seed (the driver vmaps seeds)."""

    init: Callable[[Array, Any, Any], Any]  # (key, env_state (E_all, ...), timestep) -> learner state
    update_step: Callable[[Any], tuple[Any, dict[str, Array]]]  # one iteration on one device
    act: ActFn  # evaluation policy
    init_actor_state: Callable[[int], Any]  # num eval envs -> actor state (None for feed-forward)
    eval_params: Callable[[Any], Any]  # learner state -> what ``act`` takes
    env_fields: tuple[str, ...] = ("env_state", "timestep")  # learner-state fields with an env axis


SystemBuilder = Callable[[Settings, EnvSpec, AutoResetVecEnv], System]


@dataclasses.dataclass
class RunResult:
    """What ``run`` returns (and tests inspect)."""

    settings: Settings
    learner_state: Any  # final state, leading seed axis
    eval_steps: np.ndarray  # (num_evals + 1,) env steps at each evaluation (0 = before training)
    eval_returns: np.ndarray  # (num_evals + 1, S) mean evaluation return per seed
    eval_win_rates: Optional[np.ndarray]  # (num_evals + 1, S) or None
    absolute_return: Optional[np.ndarray]  # (S,)
    train_metrics: list[dict[str, np.ndarray]]  # per chunk: name -> (U, S) values
    compile_seconds: float
    train_seconds: float  # chunks only, compile excluded
    run_dir: str


def make_envs(settings: Settings) -> tuple[MarlEnv, MarlEnv]:
    """Train and eval envs (the eval env is a separate instance; neither auto-resets by itself)."""
    global_state = bool(getattr(settings.system, "centralised_critic", False))
    kwargs = dict(settings.env.kwargs)
    train = envs.make(settings.env.name, settings.env.task, global_state=global_state, **kwargs)
    evaluation = envs.make(settings.env.name, settings.env.task, global_state=global_state, **kwargs)
    return train, evaluation


def state_specs(state: Any, env_fields: tuple[str, ...]) -> Any:
    """PartitionSpecs: env-batched fields split over devices on axis 1 (after seeds); rest replicated."""
    specs = {}
    for name in state._fields:
        spec = P(None, DEVICE_AXIS) if name in env_fields else P()
        specs[name] = jax.tree.map(lambda _: spec, getattr(state, name))
    return type(state)(**specs)


def init_learner_states(system: System, env: MarlEnv, settings: Settings) -> Any:
    """Per-seed learner states (leading axis S); seed s uses PRNGKey(arch.seed + s)."""
    seeds = jnp.arange(settings.arch.num_seeds) + settings.arch.seed

    def init_one(seed: Array) -> Any:
        key, env_key = jax.random.split(jax.random.PRNGKey(seed))
        vec = AutoResetVecEnv(env, settings.arch.num_envs)
        env_state, timestep = vec.reset(env_key)
        return system.init(key, env_state, timestep)

    return jax.jit(jax.vmap(init_one))(seeds)


def make_update_chunk(system: System, settings: Settings, mesh: Any, example_state: Any) -> Callable:
    """jit(shard_map(scan over updates of vmap over seeds)). Donates the input state."""

    def chunk(state: Any) -> tuple[Any, dict[str, Array]]:
        def one_update(state: Any, _: None) -> tuple[Any, dict[str, Array]]:
            return jax.vmap(system.update_step)(state)

        return jax.lax.scan(one_update, state, None, length=settings.num_updates_per_eval)

    specs = state_specs(example_state, system.env_fields)
    # check_vma=False: third-party env code (jumanji) scans with constant carries that vma typing
    # rejects. Replicated outputs stay identical because every gradient is pmean-ed (tested).
    sharded = jax.shard_map(chunk, mesh=mesh, in_specs=(specs,), out_specs=(specs, P()), check_vma=False)
    return jax.jit(sharded, donate_argnums=0)


def shard_state(state: Any, mesh: Any, env_fields: tuple[str, ...]) -> Any:
    specs = state_specs(state, env_fields)
    return jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), state, specs)


def summarise_eval(result: EvalResult, has_win: bool) -> dict[str, np.ndarray]:
    """Per-seed means: mean_episode_return (S,), win_rate (S,) in percent where the env has wins."""
    out = {"mean_episode_return": np.asarray(result.episode_return).mean(axis=-1),
           "mean_episode_length": np.asarray(result.episode_length).mean(axis=-1)}
    if has_win:
        out["win_rate"] = 100.0 * np.asarray(result.won_episode).mean(axis=-1)
    return out


def run(
    settings: Settings,
    build_system: SystemBuilder,
    run_dir: Optional[str] = None,
    log: Optional[Callable[[str], None]] = None,
) -> RunResult:
    """Trains ``settings.arch.num_seeds`` seeds of a system and evaluates them (Mava's protocol)."""
    arch = settings.arch
    maybe_initialize_distributed(arch.distributed)
    mesh = make_mesh(settings.num_devices)
    env, eval_env = make_envs(settings)
    spec = env.spec
    vec_env = AutoResetVecEnv(env, settings.envs_per_device, arch.num_resets)
    system = build_system(settings, spec, vec_env)
    algorithm = settings.system.name
    run_dir = run_dir or os.path.join(
        settings.logger.base_dir, f"{algorithm}_{settings.env.name}_{settings.env.task}_s{arch.seed}_{time.strftime('%Y%m%d-%H%M%S')}"
    )
    os.makedirs(run_dir, exist_ok=True)
    console = Console(settings.total_steps, settings.logger.progress)
    say = log or console.print
    seeds = list(range(arch.seed, arch.seed + arch.num_seeds))
    results_json = MarlEvalJson(
        settings.logger.json_path or os.path.join(run_dir, "metrics.json"),
        settings.env.name, settings.env.task, algorithm, seeds,
    )

    state = init_learner_states(system, env, settings)
    state = shard_state(state, mesh, system.env_fields)
    chunk = make_update_chunk(system, settings, mesh, state)
    evaluate = make_evaluator(system.act, system.init_actor_state, eval_env, mesh,
                              arch.num_eval_episodes, arch.evaluation_greedy)
    eval_key = jax.random.PRNGKey(arch.seed + 10_000)

    start = time.perf_counter()
    compiled = chunk.lower(state).compile()
    compile_seconds = time.perf_counter() - start
    say(f"{algorithm} on {settings.env.name}/{settings.env.task}: {arch.num_seeds} seed(s), "
        f"{settings.num_devices} device(s), {arch.num_envs} envs, {settings.num_updates_per_eval * arch.num_evaluation} "
        f"updates; compiled in {compile_seconds:.1f}s")

    def eval_params(state: Any) -> Any:
        return jax.vmap(system.eval_params)(state)

    def evaluation(params: Any, index: int) -> dict[str, np.ndarray]:
        keys = jax.random.split(jax.random.fold_in(eval_key, index), arch.num_seeds)
        return summarise_eval(evaluate(params, keys), spec.has_win)

    initial = evaluation(eval_params(state), 0)
    steps, returns, wins = [0], [initial["mean_episode_return"]], [initial.get("win_rate")]
    results_json.add(0, 0, initial, 0.0)
    best_return = initial["mean_episode_return"].copy()
    best_params = jax.device_get(eval_params(state))
    train_metrics: list[dict[str, np.ndarray]] = []
    train_seconds = 0.0
    for i in range(arch.num_evaluation):
        t0 = time.perf_counter()
        state, metrics = compiled(state)
        metrics = jax.device_get(metrics)
        elapsed = time.perf_counter() - t0
        train_seconds += elapsed
        train_metrics.append(metrics)
        step = (i + 1) * settings.steps_per_chunk
        sps = settings.steps_per_chunk * arch.num_seeds / elapsed
        params = eval_params(state)
        result = evaluation(params, i + 1)
        result["steps_per_second"] = np.full(arch.num_seeds, sps)
        results_json.add(i + 1, step, result, train_seconds)
        steps.append(step)
        returns.append(result["mean_episode_return"])
        wins.append(result.get("win_rate"))
        improved = result["mean_episode_return"] >= best_return
        if improved.any():
            host_params = jax.device_get(params)
            best_params = jax.tree.map(
                lambda new, old: np.where(improved.reshape((-1,) + (1,) * (np.ndim(new) - 1)), new, old),
                host_params, best_params,
            )
            best_return = np.maximum(best_return, result["mean_episode_return"])
        episodes = metrics["count"].sum(axis=0)
        train_return = metrics["return_sum"].sum(axis=0) / np.maximum(episodes, 1)
        win = f" win {np.mean(result['win_rate']):5.1f}%" if "win_rate" in result else ""
        line = (f"[{i + 1:>3}/{arch.num_evaluation}] step {step:>10,}  eval return "
                f"{np.mean(result['mean_episode_return']):8.3f}{win}  train return {np.mean(train_return):8.3f}  "
                f"{sps:9,.0f} steps/s")
        say(line)
        console.update(step, f"return {np.mean(result['mean_episode_return']):.3f}  {sps:,.0f} steps/s")

    absolute = None
    if arch.absolute_metric:
        absolute_eval = make_evaluator(system.act, system.init_actor_state, eval_env, mesh,
                                       arch.num_absolute_metric_eval_episodes, arch.evaluation_greedy)
        keys = jax.random.split(jax.random.fold_in(eval_key, 10**6), arch.num_seeds)
        abs_metrics = summarise_eval(absolute_eval(best_params, keys), spec.has_win)
        results_json.add_absolute(abs_metrics)
        absolute = abs_metrics["mean_episode_return"]
        say(f"absolute metric (best params, {arch.num_absolute_metric_eval_episodes} episodes): "
            f"return {np.mean(absolute):.3f}")
    results_json.write()
    console.close()
    eval_steps = np.asarray(steps)
    eval_returns = np.stack(returns)
    if settings.logger.plot:
        plot_curve(os.path.join(run_dir, "learning_curve.png"), eval_steps, eval_returns,
                   f"{algorithm} {settings.env.name}/{settings.env.task}")
    say(f"trained {settings.total_steps * arch.num_seeds:,} steps in {train_seconds:.1f}s "
        f"(+{compile_seconds:.1f}s compile); results in {run_dir}")
    return RunResult(
        settings=settings,
        learner_state=state,
        eval_steps=eval_steps,
        eval_returns=eval_returns,
        eval_win_rates=np.stack(wins) if spec.has_win else None,
        absolute_return=absolute,
        train_metrics=train_metrics,
        compile_seconds=compile_seconds,
        train_seconds=train_seconds,
        run_dir=run_dir,
    )


def run_from_config(cfg: Any, system_cls: type, build_system: SystemBuilder) -> float:
    """Hydra entry: validate, train, return the final mean eval return (a sweep objective)."""
    settings = load_settings(cfg, system_cls)
    result = run(settings, build_system, run_dir=_hydra_run_dir())
    return float(np.mean(result.eval_returns[-1]))


def _hydra_run_dir() -> Optional[str]:
    try:
        from hydra.core.hydra_config import HydraConfig

        return HydraConfig.get().runtime.output_dir
    except Exception:  # not under hydra
        return None
