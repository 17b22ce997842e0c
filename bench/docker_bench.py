"""Docker benchmark: `--runtime io.containerd.revenant.v1` vs Docker's default runtime (runc) on one private
dockerd (harness node + dockerd from /opt/revenant-test/docker), the two interleaved so machine noise
hits both alike.

* start-to-exit: wall time of `docker run --rm --network none busybox true`;
* a protected container's checkpoint-and-move, as `revenant rehearse` measures it: freeze time, restore
  time (new container created until it runs restored) for a small shell job.

  .venv/bin/python bench/docker_bench.py --runs 20
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from harness.docker import REVENANT_RUNTIME, RUNC_RUNTIME, DockerHost  # noqa: E402
from harness.images import build_test_images  # noqa: E402

COUNTER = "i=0; while true; do i=$((i+1)); echo $i > /tmp/progress; sleep 0.1; done"


def time_run(host: DockerHost, runtime: str) -> float:
    t0 = time.perf_counter()
    host.docker("run", "--rm", "--network", "none", "--runtime", runtime, host.busybox, "true")
    return time.perf_counter() - t0


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--interruptions", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="docker-bench-") as tmp:
        host = DockerHost("bench", build_test_images(Path(tmp) / "images"))
        try:
            times: dict[str, list[float]] = {RUNC_RUNTIME: [], REVENANT_RUNTIME: []}
            for rt in times:  # warm-up: image layers, shim binaries in the page cache
                time_run(host, rt)
            for _ in range(args.runs):
                for rt in times:
                    times[rt].append(time_run(host, rt))
            print(f"docker run --rm busybox true, {args.runs} runs each (seconds):")
            print(f"{'runtime':28} {'p10':>7} {'median':>7} {'p90':>7}")
            for rt, v in times.items():
                print(f"{rt:28} {pct(v, 0.1):7.3f} {statistics.median(v):7.3f} {pct(v, 0.9):7.3f}")
            ratio = statistics.median(times[REVENANT_RUNTIME]) / statistics.median(times[RUNC_RUNTIME])
            print(f"median ratio revenant/runc: {ratio:.2f}")

            res = subprocess.run(
                [str(REPO / ".venv" / "bin" / "revenant"), "rehearse", "--json", "--run-dir",
                 str(host.node.revenant_run_dir), "-n", str(args.interruptions), "--min", "1", "--max", "2",
                 "--seed", "1", "--progress-file", "/tmp/progress", host.busybox, "--", "sh", "-c", COUNTER],
                capture_output=True, text=True, env=host.docker_daemon.env, timeout=600,
            )  # fmt: skip
            report = json.loads(res.stdout)
            steps = report["interruptions"]
            print(f"\nrevenant rehearse, busybox counter, {len(steps)} interruptions (ok: {report['ok']}):")
            for key in ("freeze_s", "checkpoint_s", "restore_s"):
                vals = [s[key] for s in steps if s[key] is not None]
                if vals:
                    print(
                        f"  {key:13} median {statistics.median(vals):.3f}s  (min {min(vals):.3f}, max {max(vals):.3f})"
                    )
            sizes = [s["checkpoint_bytes"] for s in steps if s["checkpoint_bytes"]]
            if sizes:
                print(f"  checkpoint    median {statistics.median(sizes) / 1024:.1f} KiB")
            return 0 if report["ok"] else 1
        finally:
            host.destroy()


if __name__ == "__main__":
    sys.exit(main())
