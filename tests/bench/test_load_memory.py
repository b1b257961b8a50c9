"""bench/load_memory.py runs end to end (on the tiny model, so that the script does not rot)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from bench.common import ROOT


def test_load_memory_prints_every_way():
    out = subprocess.run(
        [sys.executable, "bench/load_memory.py", "--model", "builtin:tiny-sd", "--jobs", "2"],  # 2: both CPU cores
        cwd=ROOT, capture_output=True, text=True, timeout=600, check=True,
    ).stdout  # fmt: skip
    rows = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| way")]
    assert len(rows) == 4, out
    assert [row.split(" | ")[0] for row in rows] == ["| imports only", "| float32, as training loads it (load_part)",
        "| bf16, as training holds frozen weights (load_part + cast_frozen_)", "| bf16 through diffusers' torch_dtype"]  # fmt: skip
    for row in rows:
        peak = float(row.split("|")[2])
        assert 0.1 < peak < 20, row  # a whole Python process with torch, in GB


@pytest.mark.slow  # 4 processes and a single-file conversion: about 20-40 s; `make test-all` runs it
def test_load_memory_ranks_mode_measures_each_source():
    out = subprocess.run(
        [sys.executable, "bench/load_memory.py", "--model", "builtin:tiny-sd", "--ranks", "2"],
        cwd=ROOT, capture_output=True, text=True, timeout=600, check=True,
    ).stdout  # fmt: skip
    rows = [line for line in out.splitlines() if line.startswith("| a diffusers") or line.startswith("| one ")]
    assert len(rows) == 2, out
    for row in rows:
        private, pss, rss = (float(c) for c in row.split("|")[2:5])
        assert 0 < private <= pss <= rss < 20, row  # each process's own pages, its share, all it maps (GB)
