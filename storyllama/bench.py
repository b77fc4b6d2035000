"""`bin/bench` / `make bench`: run the pytest-benchmark suite, keep its JSON, print a short table.

Every benchmark records its physical figures (tokens/s, MB/s, GB/s, peak memory, ratios) in
`extra_info`; the table prints those, one row per benchmark, so variants measured in the same run
sit side by side.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def format_table(report: dict) -> str:
    rows = []
    for b in report.get("benchmarks", []):
        info = b.get("extra_info", {})
        figures = ", ".join(f"{k}={_fmt(v)}" for k, v in info.items())
        rows.append((b["name"], f"{b['stats']['mean']:.3f}", figures))
    if not rows:
        return "(no benchmarks ran)"
    w0 = max(len(r[0]) for r in rows)
    lines = [f"{'benchmark':<{w0}}  {'mean s':>8}  figures", "-" * (w0 + 40)]
    lines += [f"{n:<{w0}}  {t:>8}  {f}" for n, t, f in rows]
    return "\n".join(lines)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:,.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bin/bench", description=__doc__.split("\n\n")[0])
    p.add_argument("-k", default=None, help="only benchmarks matching this pytest -k expression (default: all)")
    p.add_argument("paths", nargs="*", default=[str(ROOT / "benchmarks")],
                   help="benchmark files or directories to run (default: benchmarks/)")
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    results = ROOT / "benchmarks" / "results"
    results.mkdir(parents=True, exist_ok=True)
    out = results / f"bench-{time.strftime('%Y%m%d-%H%M%S')}.json"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *a.paths, f"--benchmark-json={out}",
           "--benchmark-only"]
    if a.k:
        cmd += ["-k", a.k]
    rc = subprocess.call(cmd, cwd=ROOT)
    if out.exists():
        print("\n" + format_table(json.loads(out.read_text())))
        print(f"\nJSON: {out}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
