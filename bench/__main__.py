"""`make bench`: every benchmark at its default (minutes-scale) size, one after another.

Each one runs revenant beside its baseline in the same run and prints the ratios; the figures recorded
in bench/RESULTS.md come from these commands (some with larger sizes, as RESULTS.md says). Pass
`--only NAME` to run one, `--list` to see them.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
BENCHMARKS = {
    "ttrpc": ["ttrpc_bench.py"],
    "shim": ["shim_bench.py", "--runs", "20"],
    "snapshotter": ["snapshotter_bench.py"],
    "store": ["store_bench.py", "--size", "512"],
    "lazy-store": ["lazy_store_bench.py"],
    "checkpoint": ["checkpoint_bench.py"],
    "protect": ["protect_bench.py"],
    # 0.125 + 0.25 GiB: tables on stdout, plots + JSON in a temporary directory (RESULTS.md has the
    # recorded run's, made with --out-dir bench)
    "sweep": ["sweep_bench.py"],
    "pod": ["pod_bench.py", "--runs", "10", "--pods", "4"],
    "docker": ["docker_bench.py", "--runs", "20"],
    "economics": ["economics.py"],
}


def main() -> int:
    ap = argparse.ArgumentParser(
        prog="make bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--only", action="append", choices=sorted(BENCHMARKS), help="run just these")
    ap.add_argument("--list", action="store_true")
    args = ap.parse_args()
    if args.list:
        for name, argv in BENCHMARKS.items():
            print(f"{name:12} bench/{' '.join(argv)}")
        return 0
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(BENCH.parent / "tests"), str(BENCH.parent)])}
    failed = []
    for name in args.only or list(BENCHMARKS):
        script, *rest = BENCHMARKS[name]
        if not (BENCH / script).exists():
            print(f"== {name}: bench/{script} is missing", flush=True)
            failed.append(name)
            continue
        print(f"== {name}: bench/{script} {' '.join(rest)}", flush=True)
        start = time.monotonic()
        rc = subprocess.run([sys.executable, str(BENCH / script), *rest], env=env).returncode
        print(f"== {name}: exit {rc} after {time.monotonic() - start:.0f}s\n", flush=True)
        if rc != 0:
            failed.append(name)
    if failed:
        print(f"benchmarks that failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
