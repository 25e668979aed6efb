"""Golden runs (``tests/golden/runs.py``): refactors that change no maths keep every system's final
parameters bit for bit. Recorded on this project's CPU machines; on a machine whose CPU or jax
differs from the recording's, float-level differences are tolerated (and the test says so).

Default suite: one run per main update path (listed in FAST); the other
runs are marked slow (``python -m pytest -m slow tests/test_golden.py`` or ``python tests/golden/runs.py check``).
"""

import numpy as np
import pytest

from golden import runs

FAST = {("mappo", "ff", "shared"), ("a2po", "ff", "separate")}  # ippo-ff-separate: -m slow (a2po covers separate)
# one-stage shared, joint separate, gather; the recurrent runs (and the rest) with -m slow


def params(run):
    marks = () if run in FAST else (pytest.mark.slow,)
    return pytest.param(run, id=runs.name(*run), marks=marks)


@pytest.mark.parametrize("run", [params(r) for r in runs.RUNS])
def test_golden_run_reproduces_recorded_parameters(run, tmp_path):
    want = runs.load(run)
    got = runs.final_params(*run, results_dir=str(tmp_path))
    exact, worst = runs.compare(got, want)
    recorded = str(np.load(runs.PATH)["__machine__"])
    if recorded == runs.machine():
        assert exact, f"{runs.name(*run)} differs from the golden run by up to {worst:.3g}"
    else:  # another CPU / jax: XLA may fuse differently; the maths must still agree
        assert worst < 1e-4, f"{runs.name(*run)} differs by {worst:.3g} (recorded on {recorded})"
