"""Load a checkpoint and evaluate it, without training.

    python systems/evaluate.py checkpoint=results/<run folder>
    python systems/evaluate.py checkpoint=results/<run folder> params=best episodes=320 greedy=true
    python systems/evaluate.py checkpoint=results/<run folder>/checkpoints/3 render=true

``checkpoint`` is a run folder, its ``checkpoints/`` folder or one numbered checkpoint; the system,
env and networks are rebuilt from the config saved in the checkpoint. Arguments are ``key=value``
(or ``--key value``):

    which      latest | best | <n>   which checkpoint of the folder (default latest)
    params     final | best          the checkpoint's parameters, or the best evaluated ones so far
    episodes   episodes per seed (default: the run's arch.num_eval_episodes)
    greedy     true | false          the mode of the policy instead of a sample (default: the run's)
    eval_seed  an integer selecting other evaluation episodes (default 0)
    render     true: also play one episode of the first seed and write it as a GIF (or PNG frames)
    render_dir where the GIF goes (default: <run folder>/render)
    output     a JSON file for the metrics (per seed and mean)
    num_devices  devices to split the episodes over (default: as many as divide the episodes)

Exit status 2 with a one-line message for a wrong or unreadable checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from systems.anakin import Setup, init_learner_states, make_evaluate, prepare
from systems.contract import stacked_eval_params
from systems.settings import Settings, load_settings
from utils import checkpointing
from utils.checkpointing import CheckpointError, load_entry_point
from utils.config import ConfigError
from utils.devices import dividing_count, use_every_core

EVAL_INDEX_OFFSET = 2_000_000  # evaluation keys differ from those used during training


class Loaded(NamedTuple):
    settings: Settings
    setup: Setup
    params: Any  # (S, ...) evaluation parameters, replicated over the mesh
    meta: dict[str, Any]
    path: str  # the checkpoint folder


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """``key=value`` words become ``--key=value`` so both spellings work."""
    argv = list(sys.argv[1:] if argv is None else argv)
    argv = [a if a.startswith("-") or "=" not in a else f"--{a}" for a in argv]
    parser = argparse.ArgumentParser(description="Evaluate a checkpoint without training.")
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--which", default="latest")
    parser.add_argument("--params", choices=["final", "best"], default="final")
    parser.add_argument("--episodes", type=int, default=None)
    parser.add_argument("--greedy", type=_bool, default=None)
    parser.add_argument("--eval_seed", type=int, default=0)
    parser.add_argument("--render", type=_bool, default=False)
    parser.add_argument("--render_dir", default=None)
    parser.add_argument("--max_frames", type=int, default=None)
    parser.add_argument("--output", default=None)
    parser.add_argument("--num_devices", type=int, default=None)
    return parser.parse_args(argv)


def _bool(text: str) -> bool:
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def load_checkpoint(path: str, which: str = "latest", params: str = "final", episodes: Optional[int] = None,
                    greedy: Optional[bool] = None, num_devices: Optional[int] = None) -> Loaded:
    """Rebuilds the run's system from the checkpoint's config and loads its evaluation parameters."""
    directory, step = checkpointing.resolve(path)
    step = checkpointing.pick_step(directory, step if step is not None else which)
    meta = checkpointing.read_meta(directory, step)
    system_cls = load_entry_point(meta["system_config"])
    build_system = load_entry_point(meta["build_system"])

    config = json.loads(json.dumps(meta["config"]))
    arch = config["arch"]
    if episodes is not None and episodes % arch["num_eval_episodes"]:
        arch["num_eval_episodes"] = episodes  # else: the run's evaluator, repeated
    if greedy is not None:
        arch["evaluation_greedy"] = greedy
    arch["num_absolute_metric_eval_episodes"] = arch["num_eval_episodes"]
    arch["num_devices"] = num_devices or dividing_count([arch["num_envs"], arch["num_eval_episodes"]], jax.device_count())
    arch.update(distributed=False, coordinator_address=None, num_processes=None, process_id=None)  # one process
    config["logger"].update(resume=False, neptune={**config["logger"]["neptune"], "enabled": False})
    try:
        settings = load_settings(config, system_cls)
    except ConfigError as err:
        raise CheckpointError(f"the config saved in {checkpointing.step_path(directory, step)} is not valid "
                              f"here: {err}") from err
    setup = prepare(settings, build_system)
    # Shapes only (nothing is computed): the structure the parameters are restored onto.
    shapes = jax.eval_shape(lambda: stacked_eval_params(setup.system, init_learner_states(setup.system, setup.env, settings)))
    name = "best_params" if params == "best" else "params"
    zeros = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
    target = {"best_params": zeros, "best_return": np.zeros(settings.num_runs, np.float64), "params": zeros}
    _, host, meta = checkpointing.restore(directory, step, host_target=target)
    loaded = jax.device_put(host[name], NamedSharding(setup.mesh, P()))
    return Loaded(settings, setup, loaded, meta, checkpointing.step_path(directory, step))


def render_episode(setup: Setup, settings: Settings, params: Any, key: jax.Array, max_frames: int) -> list[np.ndarray]:
    """Frames (H, W, 3) of one episode of the first seed's policy; [] if the env cannot render."""
    env, system = setup.eval_env, setup.system
    one = jax.tree.map(lambda x: np.asarray(x)[0], params)
    greedy = settings.arch.evaluation_greedy
    act = jax.jit(lambda p, ts, k, s: system.act(p, ts, k, s, greedy))
    reset, step = jax.jit(env.reset), jax.jit(env.step)
    reset_key, key = jax.random.split(key)
    state, timestep = reset(reset_key)
    try:
        frames = [np.array(env.render(state), copy=True)]
    except NotImplementedError:
        return []
    actor_state = system.init_actor_state(1)
    while len(frames) < max_frames and not bool(timestep.last()):
        key, act_key = jax.random.split(key)
        batched = jax.tree.map(lambda x: x[None], timestep)
        action, actor_state = act(one, batched, act_key, actor_state)
        state, timestep = step(state, jax.tree.map(lambda x: x[0], action))
        frames.append(np.array(env.render(state), copy=True))
    return frames


def save_frames(frames: list[np.ndarray], directory: str, name: str = "episode") -> str:
    """A GIF (Pillow) or, without Pillow, numbered PNG frames; returns the path written."""
    os.makedirs(directory, exist_ok=True)
    try:
        from PIL import Image
    except ImportError:
        import matplotlib.pyplot as plt

        for i, frame in enumerate(frames):
            plt.imsave(os.path.join(directory, f"{name}_{i:04d}.png"), frame)
        return directory
    path = os.path.join(directory, f"{name}.gif")
    images = [Image.fromarray(np.asarray(f, np.uint8)) for f in frames]
    for image in images:
        image.thumbnail((480, 480))  # viewers draw at 1000 px; a GIF that size is needlessly large
    images[0].save(path, save_all=True, append_images=images[1:], duration=150, loop=0)
    return path


def evaluate_checkpoint(args: argparse.Namespace, say: Callable[[str], None] = print) -> dict[str, Any]:
    loaded = load_checkpoint(args.checkpoint, args.which, args.params, args.episodes, args.greedy, args.num_devices)
    settings, meta = loaded.settings, loaded.meta
    arch = settings.arch
    evaluate = make_evaluate(loaded.setup, settings)
    episodes = args.episodes or arch.num_eval_episodes
    metrics = evaluate(loaded.params, EVAL_INDEX_OFFSET + args.eval_seed, episodes)
    seeds = meta.get("seeds", settings.run_seeds)
    combos = settings.run_combinations  # "" without a sweep
    mode = "greedy" if arch.evaluation_greedy else "stochastic"
    say(f"{settings.system.name} on {settings.env.name}/{settings.env.task}: checkpoint {loaded.path} "
        f"(evaluation {meta['eval_index']}, env step {meta['env_steps']:,}), {args.params} parameters, "
        f"{episodes} {mode} episodes per seed")
    for i, seed in enumerate(seeds):
        parts = "  ".join(f"{name} {float(values[i]):.3f}" for name, values in metrics.items())
        say(f"  seed {seed}{' ' + combos[i] if combos[i] else ''}: {parts}")
    summary = {name: float(np.mean(values)) for name, values in metrics.items()}
    say("  mean:   " + "  ".join(f"{name} {value:.3f}" for name, value in summary.items()))
    out: dict[str, Any] = {
        "checkpoint": loaded.path, "params": args.params, "episodes": episodes, "greedy": arch.evaluation_greedy,
        "seeds": seeds, **({"runs": settings.run_labels} if settings.sweep else {}),
        "per_seed": {name: np.asarray(v).tolist() for name, v in metrics.items()}, "mean": summary,
    }
    if args.render:
        run_dir = os.path.dirname(os.path.dirname(loaded.path))
        frames = render_episode(loaded.setup, settings, loaded.params, jax.random.PRNGKey(args.eval_seed),
                                args.max_frames or loaded.setup.eval_env.time_limit + 1)
        if frames:
            out["render"] = save_frames(frames, args.render_dir or os.path.join(run_dir, "render"))
            say(f"  rendered {len(frames)} frames to {out['render']}")
        else:
            say(f"  {settings.env.name} cannot render; no frames written")
    if args.output:
        from utils.logging import atomic_write_text

        atomic_write_text(args.output, json.dumps(out, indent=1))
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    use_every_core(args.num_devices is not None)  # before jax starts: the episodes split over every core
    try:
        evaluate_checkpoint(args)
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
