"""Golden runs: the final parameters of a short run of every PPO-family system, recorded once and
checked after every refactor (``tests/test_golden.py``). A refactor that changes no maths must
reproduce them bit for bit on the machine that recorded them.

    python tests/golden/runs.py record     # writes tests/golden/params.npz (on purpose only)
    python tests/golden/runs.py record coppo-ff-shared ...   # re-records those runs only
    python tests/golden/runs.py check      # bit-exact comparison, one line per run
    python tests/golden/runs.py check mappo-ff-shared ...    # those runs only

Runs here are compiled with XLA's default flags (the ones users train with), not the test suite's
faster-compiling ones: ``tests/test_golden.py`` runs this script in a subprocess.
"""

from __future__ import annotations

import importlib
import os
import platform
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/

import jax  # noqa: E402
import numpy as np  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
PATH = os.path.join(HERE, "params.npz")
SYSTEMS = ("ippo", "mappo", "coppo", "happo", "a2po")
KINDS = ("ff", "rnn")
SHARING = ("shared", "separate")
RUNS = [(s, k, p) for s in SYSTEMS for k in KINDS for p in SHARING]
# 3 agents (sequential methods need more than 2), tiny networks, 2 updates on 2 devices.
COMMON = ["env=lbf", "env.task=10x10-3p-3f", "arch.num_envs=8", "arch.num_devices=2", "arch.num_evaluation=1",
          "arch.total_timesteps=128", "system.rollout_length=8", "system.ppo_epochs=2", "system.num_minibatches=2",
          "system.actor_lr=1e-3", "system.critic_lr=1e-3", "network.actor_layers=[16]", "network.critic_layers=[16]"]
ELSEWHERE = 1e-4  # largest difference allowed on a machine other than the recording one
RNN = ["network=rnn", "network.rnn_pre_layers=[16]", "network.rnn_hidden_size=16", "network.rnn_post_layers=[16]"]


def name(system: str, kind: str, sharing: str) -> str:
    return f"{system}-{kind}-{sharing}"


def final_params(system: str, kind: str, sharing: str, results_dir: str | None = None) -> dict[str, np.ndarray]:
    """Parameters after two updates, flattened to {path: array}. Run folders go to ``results_dir``
    (default ``$GOLDEN_RESULTS_DIR``, else /tmp/golden)."""
    results_dir = results_dir or os.environ.get("GOLDEN_RESULTS_DIR", "/tmp/golden")
    from helpers import small_settings
    from systems import anakin

    module = importlib.import_module(f"systems.{system}_anakin")
    overrides = COMMON + ([] if kind == "ff" else RNN) + [f"network.parameter_sharing={sharing}"]
    settings = small_settings(system, module.CONFIG, overrides, results_dir)
    setup = anakin.prepare(settings, module.build)
    state = anakin.initial_state(setup, settings)
    chunk, _ = anakin.compile_update_chunk(setup.system, settings, setup.mesh, state)
    state, _ = chunk(state)
    leaves = jax.tree_util.tree_flatten_with_path(jax.device_get(state.params))[0]
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves}


def machine() -> str:
    """The CPU model and the vector extensions XLA's CPU code generation depends on, and jax's
    version: two machines with the same string give bit-identical runs (``platform.processor()``
    is empty on Linux, so it alone told an AVX-512 machine from an AVX2 one apart by nothing)."""
    model, flags = platform.processor(), set()
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and not model:
                    model = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    isa = "+".join(f for f in ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_bf16", "amx_tile") if f in flags)
    return f"{platform.machine()} {model} {isa} jax {jax.__version__}"


def record(only: list[str] | None = None) -> None:
    """Records every run, or re-records the runs named in ``only`` (keeping the others)."""
    out = {"__machine__": np.asarray(machine())}
    if only:
        old = np.load(PATH)
        out.update({key: old[key] for key in old.files if key.split("|")[0] not in only and key != "__machine__"})
    for run in RUNS:
        if only and name(*run) not in only:
            continue
        for path, leaf in final_params(*run).items():
            out[f"{name(*run)}|{path}"] = leaf
        print("recorded", name(*run), flush=True)
    np.savez_compressed(PATH, **out)


def load(run: tuple[str, str, str]) -> dict[str, np.ndarray]:
    data = np.load(PATH)
    prefix = name(*run) + "|"
    return {key[len(prefix):]: data[key] for key in data.files if key.startswith(prefix)}


def compare(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> tuple[bool, float]:
    """(bit-identical, largest absolute difference). Leaves are matched in order (paths may be renamed)."""
    assert len(got) == len(want), f"{len(got)} leaves, golden has {len(want)}"
    exact, worst = True, 0.0
    for g, w in zip(got.values(), want.values()):
        assert g.shape == w.shape, (g.shape, w.shape)
        exact &= bool(np.array_equal(g, w))
        worst = max(worst, float(np.max(np.abs(g.astype(np.float64) - w))) if g.size else 0.0)
    return exact, worst


def verdict(run: tuple[str, str, str]) -> tuple[bool, str]:
    """(passes, what was seen): bit-identical on the machine that recorded the runs; elsewhere (another
    CPU or jax, where XLA may fuse differently) the maths must still agree to 1e-4."""
    exact, worst = compare(final_params(*run), load(run))
    recorded = str(np.load(PATH)["__machine__"])
    if exact:
        return True, "bit-identical"
    if recorded == machine():
        return False, f"DIFFERS (max |d| {worst:.3g}) on the machine that recorded it"
    return worst < ELSEWHERE, f"differs by {worst:.3g} (limit {ELSEWHERE:g} here: recorded on {recorded}, this is {machine()})"


def check(only: list[str] | None = None) -> int:
    """Prints one line per run (``only`` the named ones) and returns the number that fail."""
    bad = 0
    for run in RUNS:
        if only and name(*run) not in only:
            continue
        ok, seen = verdict(run)
        print(f"{name(*run):24s} {'ok  ' if ok else 'FAIL'} {seen}", flush=True)
        bad += not ok
    return bad


if __name__ == "__main__":
    if sys.argv[1:2] == ["record"]:
        record(sys.argv[2:])
    elif sys.argv[1:2] == ["check"]:
        sys.exit(1 if check(sys.argv[2:]) else 0)
    else:
        raise SystemExit(__doc__)
