"""The benchmarks' peak memory is the worker's own, not its parent's."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_a_worker_peak_leaves_out_what_its_parent_held():
    held = np.ones(50_000_000)  # 400 MB resident in this (parent) process
    child = (
        f"import sys; sys.path.insert(0, {str(BENCH)!r}); from peak_memory import peak_gb; "
        "import resource; "
        "print(peak_gb(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2)"
    )
    out = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, check=True)
    ours, inherited = map(float, out.stdout.split())
    assert held.sum() == 50_000_000
    assert ours < 0.2  # a bare interpreter
    assert inherited > ours  # what the benchmarks reported before: the parent's 400 MB
