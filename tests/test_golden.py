"""Golden runs (``tests/golden/runs.py``): refactors that change no maths keep every system's final
parameters bit for bit. Recorded on this project's CPU machines; on a machine whose CPU or jax
differs from the recording's, float-level differences are tolerated (and the test says so).

Each run is checked by ``python tests/golden/runs.py check NAME`` in a subprocess with XLA's default
flags, not the suite's faster-compiling ones (``conftest.FAST_COMPILE``): the recorded parameters are
those of an optimised build.

Default suite: one run per main update path (listed in FAST); the other
runs are marked slow (``python -m pytest -m slow tests/test_golden.py`` or ``python tests/golden/runs.py check``).
"""

import os
import subprocess
import sys

import pytest

from golden import runs

FAST = [("mappo", "ff", "shared"), ("a2po", "ff", "separate")]  # ippo-ff-separate: -m slow (a2po covers separate)
# one-stage shared, joint separate, gather; the recurrent runs (and the rest) with -m slow
SCRIPT = os.path.join(runs.HERE, "runs.py")


def check_in_subprocess(names, tmp_path):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
           "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax_cache"), "GOLDEN_RESULTS_DIR": str(tmp_path / "results")}
    proc = subprocess.run([sys.executable, SCRIPT, "check", *names], env=env, cwd=str(tmp_path),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    for name in names:
        assert any(line.startswith(name + " ") and " ok " in line for line in proc.stdout.splitlines()), proc.stdout


def test_default_golden_runs_reproduce_recorded_parameters(tmp_path):
    """The FAST runs, in one subprocess (one interpreter start-up and one jax import for both)."""
    check_in_subprocess([runs.name(*run) for run in FAST], tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("run", [pytest.param(r, id=runs.name(*r)) for r in runs.RUNS if r not in FAST])
def test_golden_run_reproduces_recorded_parameters(run, tmp_path):
    check_in_subprocess([runs.name(*run)], tmp_path)
