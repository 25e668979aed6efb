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

FAST = {("mappo", "ff", "shared"), ("a2po", "ff", "separate")}  # ippo-ff-separate: -m slow (a2po covers separate)
# one-stage shared, joint separate, gather; the recurrent runs (and the rest) with -m slow
SCRIPT = os.path.join(runs.HERE, "runs.py")


def params(run):
    marks = () if run in FAST else (pytest.mark.slow,)
    return pytest.param(run, id=runs.name(*run), marks=marks)


@pytest.mark.parametrize("run", [params(r) for r in runs.RUNS])
def test_golden_run_reproduces_recorded_parameters(run, tmp_path):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
           "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax_cache"), "GOLDEN_RESULTS_DIR": str(tmp_path / "results")}
    proc = subprocess.run([sys.executable, SCRIPT, "check", runs.name(*run)], env=env, cwd=str(tmp_path),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert runs.name(*run) in proc.stdout and " ok " in proc.stdout, proc.stdout
