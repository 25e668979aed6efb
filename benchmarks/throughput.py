"""Training throughput of IPPO and MAPPO (and, with ``--systems``, MAT, Sable and MAGPO) next to the
env-only ceiling, plus compile time.

For each env/task, number of envs and device count: steps/s of the full training loop (rollout +
GAE + 4 epochs x 2 minibatches, Mava's ff_mappo hyperparameters) and steps/s of the same env batch
stepped with random legal actions through the same auto-reset (the ceiling). Compile time is
measured separately and excluded from steps/s. Medians over repeats.

    python benchmarks/throughput.py            # full table (about 35 minutes on 2 CPU cores)
    python benchmarks/throughput.py --quick    # 128 envs only, fewer repeats
    python benchmarks/throughput.py --tasks smax/3m --envs 256 --devices 1
    python benchmarks/throughput.py --tasks smax/3m smax/2s3z rware/tiny-2ag --envs 64 128 --devices 1 \
        --networks ff rnn --name throughput_rnn   # recurrent rows next to feed-forward ones
    python benchmarks/throughput.py --tasks lbf/8x8-2p-2f-coop coordsum/3x10 --envs 128 --devices 2 \
        --networks rnn --systems mappo sable magpo --equal-work --name throughput_joint

Tasks: rware tiny-2ag, lbf 8x8-2p-2f-coop, con-5x5x3a at 128/512/1024 envs; with the jaxmarl extra
also smax 3m, 2s3z and mpe simple_spread_3ag (continuous) at the smallest and largest env count.

Writes benchmarks/results/throughput.{json,md}. Two CPU devices come from
XLA_FLAGS=--xla_force_host_platform_device_count=2 (set here unless XLA_FLAGS is already set).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from typing import Optional

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from systems.anakin import init_learner_states, make_envs, make_update_chunk, shard_state  # noqa: E402
import importlib  # noqa: E402
from systems.settings import load_settings  # noqa: E402
from envs.vector import AutoResetVecEnv  # noqa: E402
from utils.devices import DEVICE_AXIS, make_mesh  # noqa: E402
from utils.logging import atomic_write_text  # noqa: E402

TASKS = [("rware", "tiny-2ag"), ("lbf", "8x8-2p-2f-coop"), ("connector", "con-5x5x3a")]
# JaxMARL tasks (optional extra ``.[jaxmarl]``): SMAX with heuristic enemies, MPE continuous actions.
JAXMARL_TASKS = [("smax", "3m"), ("smax", "2s3z"), ("mpe", "simple_spread_3ag")]
# Systems a row may hold, in column order (--systems); joint-policy systems ignore network=mlp/rnn except
# magpo, whose learner is the network.* actor.
SYSTEMS = ("ippo", "mappo", "mat", "sable", "magpo")
# Mava ff_mappo on this machine (joint env steps/s, Mava's defaults, 128 envs x update batch 2).
MAVA_REFERENCE = {("rware", 1): 10_900, ("lbf", 1): 18_000, ("rware", 2): 18_200, ("lbf", 2): 26_700}
CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def settings_for(system: str, env: str, task: str, num_envs: int, devices: int, updates_per_chunk: int,
                 extra: tuple[str, ...] = ()):
    from hydra import compose, initialize_config_dir

    rollout = 128
    overrides = [
        f"env={env}", f"env.task={task}", f"arch.num_envs={num_envs}", f"arch.num_devices={devices}",
        "arch.num_evaluation=1", f"arch.total_timesteps={rollout * num_envs * updates_per_chunk}",
        f"system.rollout_length={rollout}", *extra,
    ]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        cfg = compose(config_name=system, overrides=overrides)
    return load_settings(cfg, importlib.import_module(f"systems.{system}_anakin").CONFIG)


def time_calls(fn, state, repeats: int) -> tuple[list[float], object]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        state = fn(state)
        jax.block_until_ready(state)
        times.append(time.perf_counter() - start)
    return times, state


def compiled_training(settings) -> tuple:
    """(compiled update chunk, initial sharded learner state, compile seconds) of ``settings``' system."""
    mesh = make_mesh(settings.num_devices)
    env, _ = make_envs(settings)
    vec_env = AutoResetVecEnv(env, settings.envs_per_device, settings.arch.num_resets)
    system = importlib.import_module(f"systems.{settings.system.name}_anakin").build(settings, env.spec, vec_env)
    state = shard_state(init_learner_states(system, env, settings), mesh, system.env_fields)
    chunk = make_update_chunk(system, settings, mesh, state)
    start = time.perf_counter()
    compiled = chunk.lower(state).compile()
    return compiled, state, time.perf_counter() - start


def training_throughput(settings, repeats: int) -> dict:
    compiled, state, compile_s = compiled_training(settings)
    times, _ = time_calls(lambda s: compiled(s)[0], state, repeats + 1)
    median = statistics.median(times[1:])  # the first call pays one-off transfers
    return {"steps_per_second": settings.steps_per_chunk / median, "compile_seconds": compile_s}


def random_action(spec, action_mask: jax.Array, key: jax.Array) -> jax.Array:
    """Uniform legal discrete actions (E, A), or uniform continuous actions (E, A, d) in bounds."""
    if spec.action_kind == "discrete":
        return jax.random.categorical(key, jnp.where(action_mask, 0.0, -1e9))
    shape = action_mask.shape[:-1] + (spec.num_actions,)
    return jax.random.uniform(key, shape, minval=spec.action_low, maxval=spec.action_high)


def random_steps(vec_env, env_state, timestep, key: jax.Array, steps: int):
    """``steps`` auto-reset steps of the whole batch with random legal actions -> (env_state, timestep)."""

    def step(carry, k):
        env_state, timestep = carry
        act_key, reset_key = jax.random.split(k)
        action = random_action(vec_env.spec, timestep.observation.action_mask, act_key)
        env_state, timestep, _ = vec_env.step(env_state, action, reset_key)
        return (env_state, timestep), None

    (env_state, timestep), _ = jax.lax.scan(step, (env_state, timestep), jax.random.split(key, steps))
    return env_state, timestep


def env_only_throughput(settings, repeats: int) -> float:
    """Same envs, same batch and auto-reset, random legal actions: the training loop's ceiling."""
    mesh = make_mesh(settings.num_devices)
    env, _ = make_envs(settings)
    vec_env = AutoResetVecEnv(env, settings.envs_per_device, settings.arch.num_resets)
    steps = settings.system.rollout_length * settings.num_updates_per_eval

    def local(env_state, timestep, key):
        key = jax.random.fold_in(key, jax.lax.axis_index(DEVICE_AXIS))
        return random_steps(vec_env, env_state, timestep, key, steps)

    spec = P(DEVICE_AXIS)
    fn = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, P()), out_specs=(spec, spec),
                               check_vma=False))
    full = AutoResetVecEnv(env, settings.arch.num_envs)
    env_state, timestep = full.reset(jax.random.PRNGKey(0))
    key = jax.random.PRNGKey(1)
    compiled = fn.lower(env_state, timestep, key).compile()
    times, _ = time_calls(lambda s: compiled(*s, key), (env_state, timestep), repeats + 1)
    return steps * settings.arch.num_envs / statistics.median(times[1:])


def markdown(rows: list[dict], networks: bool = False, all_rows: Optional[list[dict]] = None) -> str:
    """The table; with ``networks`` a network column and mappo's steps/s relative to the
    feed-forward row of the same task, envs and devices (found in ``all_rows``, default ``rows``).
    Systems other than ippo/mappo (``--systems``) add their steps/s and their ratio to mappo's."""
    all_rows = rows if all_rows is None else all_rows
    systems = [s for s in SYSTEMS if any(s in r for r in rows)]
    extra = [s for s in systems if s not in ("ippo", "mappo")]
    head = "| env/task | envs | devices |" + (" network |" if networks else "")
    lines = [
        head + " env-only steps/s |" + "".join(f" {s} steps/s |" for s in systems) + " mappo / env-only "
        "| mappo / Mava |" + (" mappo / ff mappo |" if networks else "") + "".join(f" {s} / mappo |" for s in extra)
        + f" compile {', '.join(systems)} (s) |",
        "|---|---:|---:|" + ("---|" if networks else "") + "---:|" * (len(systems) + 4 + len(extra))
        + ("---:|" if networks else ""),
    ]

    def rate(r: dict, s: str) -> str:
        return f"{r[s]['steps_per_second']:,.0f}" if s in r else "-"

    def over_mappo(r: dict, s: str) -> str:
        return f"{r[s]['steps_per_second'] / r['mappo']['steps_per_second']:.2f}x" if s in r and "mappo" in r else "-"

    for r in rows:
        network = r.get("network", "ff")
        mava = MAVA_REFERENCE.get((r["env"], r["devices"])) if network == "ff" else None
        mappo = r["mappo"]["steps_per_second"] if "mappo" in r else None
        ratio = f"{mappo / mava:.2f}x" if mava and mappo else "-"
        ff = next((f for f in all_rows if f.get("network", "ff") == "ff" and "mappo" in f and
                   (f["env"], f["task"], f["num_envs"], f["devices"]) == (r["env"], r["task"], r["num_envs"], r["devices"])), None)
        vs_ff = f"{mappo / ff['mappo']['steps_per_second']:.2f}x" if ff and mappo else "-"
        lines.append(
            f"| {r['env']}/{r['task']} | {r['num_envs']} | {r['devices']} | " + (f"{network} | " if networks else "")
            + f"{r['env_only']:,.0f} | " + "".join(f"{rate(r, s)} | " for s in systems)
            + (f"{mappo / r['env_only']:.2f} | " if mappo else "- | ") + f"{ratio} | " + (f"{vs_ff} | " if networks else "")
            + "".join(f"{over_mappo(r, s)} | " for s in extra)
            + ", ".join(f"{r[s]['compile_seconds']:.1f}" if s in r else "-" for s in systems) + " |"
        )
    return "\n".join(lines)


def network_kind(text: str) -> str:
    """``ff``, ``rnn`` or ``rnn:K`` (K a positive chunk length)."""
    if text in ("ff", "rnn") or (text.startswith("rnn:") and text[4:].isdigit() and int(text[4:]) > 0):
        return text
    raise argparse.ArgumentTypeError(f"{text!r}: use ff, rnn or rnn:K (K steps per training sequence)")


def network_overrides(network: str) -> tuple[str, ...]:
    if network == "ff":
        return ("network=mlp",)
    chunk = network.partition(":")[2]
    return ("network=rnn",) + ((f"system.recurrent_chunk_size={chunk}",) if chunk else ())


def shown_command(script: str) -> str:
    """The command line that made a table (``--out`` and its folder left out)."""
    shown = [a for i, a in enumerate(sys.argv[1:]) if not (a == "--out" or sys.argv[i] == "--out")]
    return " ".join([f"python {script}", *shown])


def base_meta(command: str) -> dict:
    return {"command": command, "jax": jax.__version__, "backend": jax.default_backend(),
            "cpu_count": os.cpu_count(), "machine": platform.machine()}


def write_tables(out: str, name: str, meta: dict, rows: list[dict], text: str) -> None:
    """``<out>/<name>.json`` (meta and rows) and ``<out>/<name>.md`` (``text``), each written atomically."""
    os.makedirs(out, exist_ok=True)
    atomic_write_text(os.path.join(out, f"{name}.json"), json.dumps({"meta": meta, "rows": rows}, indent=1))
    atomic_write_text(os.path.join(out, f"{name}.md"), text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="128 envs only, 2 repeats")
    parser.add_argument("--envs", type=int, nargs="*", default=None, help="env counts (default 128 512 1024)")
    parser.add_argument("--devices", type=int, nargs="*", default=None, help="device counts (default 1 2)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--tasks", nargs="*", default=None,
                        help="env/task pairs such as smax/3m (default: the Jumanji three, then the JaxMARL "
                             "three where jaxmarl is installed; these at the smallest and largest env count)")
    parser.add_argument("--networks", nargs="*", default=["ff"], type=network_kind,
                        help="network kinds: ff (MLP 128x128), rnn (Mava's GRU layout: 128 -> GRU 128 -> 128), "
                             "rnn:K (the same, trained on K-step sequences: system.recurrent_chunk_size=K)")
    parser.add_argument("--systems", nargs="*", default=["ippo", "mappo"], choices=SYSTEMS,
                        help="systems per row (default ippo mappo); mat, sable and magpo train with their own "
                             "configs at mappo's work per update (--equal-work)")
    parser.add_argument("--equal-work", action="store_true",
                        help="every system at Mava's ff_mappo epochs x minibatches (4 x 2)")
    parser.add_argument("--name", default="throughput", help="output file name (results/<name>.{json,md})")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args()
    env_counts = args.envs or ([128] if args.quick else [128, 512, 1024])
    device_counts = [d for d in (args.devices or [1, 2]) if d <= jax.device_count()]
    repeats = args.repeats or (2 if args.quick else 3)

    if args.tasks:
        plan = [(tuple(t.split("/", 1)), env_counts) for t in args.tasks]
    else:
        plan = [(t, env_counts) for t in TASKS]
        if importlib.util.find_spec("jaxmarl") is not None:
            plan += [(t, sorted({env_counts[0], env_counts[-1]})) for t in JAXMARL_TASKS]

    work = ("system.ppo_epochs=4", "system.num_minibatches=2") if args.equal_work else ()
    rows = []
    for (env, task), sizes in plan:
        for num_envs in sizes:
            for devices in device_counts:
                updates = max(1, 512 // num_envs)  # about 64k-128k env steps per timed call
                env_only = None
                for network in args.networks:
                    row = {"env": env, "task": task, "num_envs": num_envs, "devices": devices, "network": network}
                    for system in args.systems:
                        settings = settings_for(system, env, task, num_envs, devices, updates,
                                                network_overrides(network) + work)
                        row[system] = training_throughput(settings, repeats)
                    env_only = env_only if env_only is not None else env_only_throughput(settings, repeats)
                    row["env_only"] = env_only
                    rows.append(row)
                    print(markdown([row], args.networks != ["ff"], rows).splitlines()[-1], flush=True)

    table = markdown(rows, args.networks != ["ff"])
    command = shown_command("benchmarks/throughput.py")
    meta = {**base_meta(command), "repeats": repeats,
            "mava_reference": {f"{k[0]}@{k[1]}dev": v for k, v in MAVA_REFERENCE.items()}}
    write_tables(
        args.out, args.name, meta, rows,
        f"# Training throughput\n\nCommand: `{command}` (jax {jax.__version__}, {jax.default_backend()}, "
        f"{os.cpu_count()} cores). Joint env steps/s per run, compile excluded, median of {repeats} "
        "repeats. Hyperparameters: Mava's ff_mappo (rollout 128, 4 epochs, 2 minibatches, MLP 128x128; "
        "network=rnn: 128 -> GRU 128 -> 128, recurrent training over the whole rollout; rnn:K: over K-step "
        "chunks, system.recurrent_chunk_size=K). "
        "'mappo / Mava' divides by Mava's ff_mappo measured on this machine at the same device count "
        "(rware 10.9k / 18.2k, lbf 18k / 26.7k steps/s on 1 / 2 devices; flat from 16 to 512 envs).\n\n"
        + table + "\n",
    )
    print(table)


if __name__ == "__main__":
    main()
