"""bench/memory.py runs end to end on an SDXL model with --phases (tiny-sdxl, so that the script does not rot): the
row, and under it the resident memory at each phase of the fit, peaks that only grow and end at the row's peak."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from bench.common import ROOT


@pytest.mark.slow  # a whole train.py fit in a child process: 20-60 s on 2 shared cores; `make test-all` runs it
def test_memory_bench_on_sdxl_prints_the_phases_of_the_fit():
    out = subprocess.run(
        [sys.executable, "bench/memory.py", "--model", "builtin:tiny-sdxl", "--resolution", "64", "--steps", "1",
         "--only", "frozen weights in bf16", "--phases"],
        cwd=ROOT, capture_output=True, text=True, timeout=600, check=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},
    ).stdout  # fmt: skip
    rows = [line for line in out.splitlines() if line.startswith("| LoRA")]
    assert len(rows) == 1 and "failed" not in rows[0], out
    peak = float(rows[0].split("|")[2])
    assert 0.1 < peak < 20, rows[0]  # a whole Python process with torch, in GB
    assert "MISSED" not in rows[0] and "met" not in rows[0]  # the targets are SD 1.5's, not tiny-sdxl's
    phases = [line for line in out.splitlines() if line.startswith("|   ")]
    names = [line.split(":")[0].strip("| ") for line in phases]
    assert names == ["set-up done (caches built)", "training starts (model loaded)", "step 1", "step 1", "step 2",
                     "step 2"], out  # fmt: skip
    so_far = [float(line.split("peak so far ")[1].split(",")[0]) for line in phases]
    assert so_far == sorted(so_far) and so_far[-1] <= peak + 0.01, phases
