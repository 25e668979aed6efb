"""Sable's chunked training (``system.timestep_chunk_size``) against the whole rollout at once.

Training steps/s of ``sable`` and ``magpo`` (Sable guider) with the tuned CoordSum 3x10 settings
(``+experiment=<system>/coordsum-3x10``), one row per chunk size (``null`` = the whole 128-step
rollout in Sable's parallel form). Every case is compiled first, then the cases are timed round
robin, one update chunk each per round, so that they share the machine's load; medians over rounds.
The chunk size changes only float rounding (``tests/test_sable.py::test_chunk_steps_equal_one_chunk``).

    python benchmarks/sable_chunks.py                                   # sable and magpo, null 8 16 32
    python benchmarks/sable_chunks.py --systems magpo --chunks null 16 --repeats 5

Writes benchmarks/results/sable_chunks.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")

import jax  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.throughput import (base_meta, compiled_training, settings_for, shown_command,  # noqa: E402
                                   write_tables)


def chunk_value(text: str) -> str:
    if text == "null" or (text.isdigit() and int(text) > 0):
        return text
    raise argparse.ArgumentTypeError(f"{text!r}: a positive number of env steps, or null")


def compiled_case(system_name: str, chunk: str, num_envs: int, devices: int):
    """(settings, compiled update chunk, state after one warm-up call, compile seconds) of one case."""
    extra = (f"+experiment={system_name}/coordsum-3x10", f"system.timestep_chunk_size={chunk}")
    settings = settings_for(system_name, "coordsum", "3x10", num_envs, devices, 1, extra)
    compiled, state, compile_s = compiled_training(settings)
    state = jax.block_until_ready(compiled(state)[0])  # warm-up call (one-off transfers)
    return settings, compiled, state, compile_s


def markdown(rows: list[dict]) -> str:
    lines = ["| system | timestep_chunk_size | iteration ms (median) | steps/s | vs null | compile s |",
             "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        base = next(b for b in rows if b["system"] == r["system"] and b["chunk"] == "null")
        lines.append(f"| {r['system']} | {r['chunk']} | {r['ms']:,.0f} | {r['steps_per_second']:,.0f} | "
                     f"{base['ms'] / r['ms']:.2f}x | {r['compile_seconds']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--systems", nargs="*", default=["sable", "magpo"], choices=["sable", "magpo"])
    parser.add_argument("--chunks", nargs="*", default=["null", "8", "16", "32"], type=chunk_value)
    parser.add_argument("--envs", type=int, default=128)
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (one update per case each)")
    parser.add_argument("--name", default="sable_chunks")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args()
    chunks = args.chunks if "null" in args.chunks else ["null", *args.chunks]

    cases = {}
    for system_name in args.systems:
        for chunk in chunks:
            cases[system_name, chunk] = list(compiled_case(system_name, chunk, args.envs, args.devices))
            print(f"compiled {system_name} timestep_chunk_size={chunk} in {cases[system_name, chunk][3]:.1f} s",
                  flush=True)
    times = {key: [] for key in cases}
    for round_ in range(args.repeats):
        for key, case in cases.items():
            start = time.perf_counter()
            case[2] = jax.block_until_ready(case[1](case[2])[0])
            times[key].append(time.perf_counter() - start)
        print(f"round {round_ + 1}/{args.repeats}: " + ", ".join(
            f"{s}/{c} {times[s, c][-1] * 1000:.0f} ms" for s, c in cases), flush=True)

    rows = []
    for (system_name, chunk), (settings, _, _, compile_s) in cases.items():
        median = statistics.median(times[system_name, chunk])
        rows.append({"system": system_name, "chunk": chunk, "ms": median * 1000,
                     "steps_per_second": settings.steps_per_chunk / median, "compile_seconds": compile_s,
                     "all_ms": [t * 1000 for t in times[system_name, chunk]]})
    table = markdown(rows)
    command = shown_command("benchmarks/sable_chunks.py")
    meta = {**base_meta(command), "envs": args.envs, "devices": args.devices, "repeats": args.repeats}
    write_tables(
        args.out, args.name, meta, rows,
        f"# Sable's training in chunks: system.timestep_chunk_size\n\nCommand: `{command}` (jax {jax.__version__}, "
        f"{jax.default_backend()}, {os.cpu_count()} cores, {args.devices} devices, {args.envs} envs). Tuned CoordSum "
        "3x10 settings (`+experiment=<system>/coordsum-3x10`: sable 15 epochs x 2 minibatches, embed 64, 2 blocks; "
        "magpo 10 x 8, Sable guider embed 32, 2 blocks, GRU learner), rollout 128 steps x 3 agents. One "
        f"iteration per timed call, cases timed round robin, median of {args.repeats} rounds.\n\n" + table + "\n")
    print(table)


if __name__ == "__main__":
    main()
