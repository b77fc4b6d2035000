"""CPU training throughput and peak memory: eager against compiled, in the same run.

Each variant runs in its own process (benchmarks/train_step.py) so its peak RSS is its own. A 2048^3
fp32 matmul measured in the same run gives the machine's achievable GFLOP/s for comparison.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
_results: dict[str, dict] = {}


def run_variant(*args: str) -> dict:
    out = subprocess.run([sys.executable, str(HERE / "train_step.py"), *args], check=True, capture_output=True,
                         text=True, cwd=HERE.parent)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_matmul_gflops(benchmark):
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b

    def mm():
        t0 = time.perf_counter()
        for _ in range(3):
            a @ b
        return 3 * 2 * 2048**3 / (time.perf_counter() - t0) / 1e9

    gflops = benchmark.pedantic(mm, rounds=3, iterations=1)
    _results["matmul"] = {"gflops": gflops}
    benchmark.extra_info["GFLOP_per_s"] = gflops


VARIANTS = {
    "small-eager": ["--preset", "small", "--batch", "8", "--block", "256"],
    "small-compile": ["--preset", "small", "--batch", "8", "--block", "256", "--compile"],
    "small-eager-doc": ["--preset", "small", "--batch", "8", "--block", "256", "--doc_aligned"],
    "small-eager-muon": ["--preset", "small", "--batch", "8", "--block", "256", "--optimizer", "muon"],
    # --dropout (residual stream) keeps the flash kernel; --attn_dropout sends CPU attention to the math kernel
    "small-eager-dropout": ["--preset", "small", "--batch", "8", "--block", "256", "--dropout", "0.1"],
    "small-eager-attndropout": ["--preset", "small", "--batch", "8", "--block", "256", "--dropout", "0.1",
                                "--attn_dropout", "0.1"],
    "88m-eager": ["--preset", "storyllama-88m", "--batch", "4", "--block", "512"],
    "88m-eager-doc": ["--preset", "storyllama-88m", "--batch", "4", "--block", "512", "--doc_aligned"],
    "88m-eager-muon": ["--preset", "storyllama-88m", "--batch", "4", "--block", "512", "--optimizer", "muon"],
    "88m-compile": ["--preset", "storyllama-88m", "--batch", "4", "--block", "512", "--compile"],
    "88m-compile-fusedce": ["--preset", "storyllama-88m", "--batch", "4", "--block", "512", "--compile",
                            "--fused_ce"],
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_train_throughput(benchmark, name):
    r = benchmark.pedantic(run_variant, args=tuple(VARIANTS[name]), rounds=1, iterations=1)
    _results[name] = r
    benchmark.extra_info.update({"tok_per_s": r["tok_per_s"], "GFLOP_per_s": r["gflops"],
                                 "peak_rss_MB": r["peak_rss_mb"], "params_M": r["params_m"]})
    if "matmul" in _results:
        benchmark.extra_info["frac_of_matmul"] = r["gflops"] / _results["matmul"]["gflops"]
    base = _results.get(name.split("-")[0] + "-eager")  # -doc, -muon, -dropout: their cost against the plain step
    if base is not None and base is not r:
        benchmark.extra_info["speedup_vs_eager"] = r["tok_per_s"] / base["tok_per_s"]
        benchmark.extra_info["rss_vs_eager"] = r["peak_rss_mb"] / base["peak_rss_mb"]
