"""benchmarks/gpu_check.sh --dry-run runs every stage on tiny shapes and prints one table with every row, so
the GPU check cannot rot unseen on a machine without a GPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

ROWS = ["tests/test_kernels.py"]
OPS, IMPLS, ON_OFF = ("rmsnorm", "rope", "swiglu", "linear_ce"), ("eager", "compiled", "triton"), ("off", "on")
ROWS += [f"{op} {impl}" for op in OPS for impl in IMPLS]
ROWS += [f"{p} kernels={k} compile={c}" for p in ("small", "storyllama-88m") for k in ON_OFF for c in ON_OFF]
ROWS += ["copy bandwidth"] + [f"batch {b} {s}" for b in (1, 8) for s in ("eager step", "compiled step (CUDA graph)")]
ROWS += ["world size 1"]


def test_gpu_check_dry_run_prints_every_row():
    env = {**os.environ, "PYTHON": sys.executable}
    res = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--dry-run"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    table = res.stdout[res.stdout.index("gpu_check --dry-run"):]
    lines = table.splitlines()
    assert lines[1].split()[:3] == ["stage", "case", "ms"]
    for row in ROWS:
        hits = [line for line in lines if row in line]
        assert len(hits) >= 1, f"no row {row!r} in\n{table}"
        assert not any("ERROR" in h or "FAILED" in h for h in hits), hits
    assert "passed" in next(line for line in lines if "tests/test_kernels.py" in line)
    assert "overhead" in next(line for line in lines if "world size 1" in line)
