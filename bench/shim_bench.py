"""Shim benchmark: revenant's shim vs the stock runc shim, side by side on one private containerd.

  * start-to-exit: wall time of `ctr run --rm <busybox> <id> true`, median (and p10/p90) of N runs,
    the two runtimes interleaved so machine noise hits both alike;
  * idle shim RSS: resident memory of the shim serving one `sleep` task, after it settled;
  * where revenant's time goes: interpreter start, the `start` action, the server's imports.

    .venv/bin/python bench/shim_bench.py --runs 30
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from harness.containerd import ContainerdNode  # noqa: E402
from harness.images import build_test_images  # noqa: E402

RUNC, REVENANT = "io.containerd.runc.v2", "io.containerd.revenant.v1"
VENV_PY = REPO / ".venv" / "bin" / "python"
SHIM = REPO / ".venv" / "bin" / "containerd-shim-revenant-v1"


def run_flags(node: ContainerdNode, runtime: str) -> list[str]:
    return ["--runtime", runtime] + (["--runc-root", str(node.runc_root)] if runtime == RUNC else [])


def time_run(node: ContainerdNode, runtime: str, image: str, cid: str) -> float:
    t0 = time.perf_counter()
    node.ctr("run", "--rm", *run_flags(node, runtime), image, cid, "true", input="")
    return time.perf_counter() - t0


def shim_pids(node: ContainerdNode, runtime: str) -> list[int]:
    binary = b"containerd-shim-runc-v2" if runtime == RUNC else b"containerd-shim-revenant-v1"
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if node.address.encode() in argv and binary in argv[0] + (argv[1] if len(argv) > 1 else b""):
            pids.append(int(proc.name))
    return pids


def rss_pss_kib(pid: int) -> tuple[int, int]:
    status = (Path("/proc") / str(pid) / "status").read_text()
    rss = int(next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1])
    rollup = (Path("/proc") / str(pid) / "smaps_rollup").read_text()
    pss = int(next(line for line in rollup.splitlines() if line.startswith("Pss:")).split()[1])
    return rss, pss


def idle_memory(node: ContainerdNode, runtime: str, image: str, count: int) -> tuple[int, int, int]:
    """(shim processes, total VmRSS KiB, total Pss KiB) of the shims serving `count` idle tasks."""
    ids = [f"idle-{runtime.split('.')[-2]}-{i}" for i in range(count)]
    for cid in ids:
        node.ctr("run", "-d", *run_flags(node, runtime), image, cid, "sleep", "1000", input="")
    time.sleep(2.0)  # let start-up garbage settle
    pids = shim_pids(node, runtime)
    rss = pss = 0
    for pid in pids:
        r, p = rss_pss_kib(pid)
        rss, pss = rss + r, pss + p
    for cid in ids:
        node.ctr("task", "kill", "-s", "SIGKILL", cid, check=False)
    for cid in ids:
        for _ in range(100):
            if "STOPPED" in node.ctr("task", "ls").stdout.split(cid, 1)[-1].split("\n", 1)[0]:
                break
            time.sleep(0.05)
        node.ctr("task", "rm", "-f", cid, check=False)
        node.ctr("container", "rm", cid, check=False)
    return len(pids), rss, pss


def median_wall(argv: list[str], n: int = 15) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        subprocess.run(argv, check=True, capture_output=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def breakdown() -> dict[str, float]:
    bundle = Path(tempfile.mkdtemp(prefix="shim-bench-")) / "state" / "io.containerd.runtime.v2.task" / "ns" / "x"
    (bundle / "rootfs").mkdir(parents=True)
    return {
        "shim delete, nothing left to clean (containerd runs it after every task)": median_wall(
            [str(SHIM), "-namespace", "ns", "-id", "x", "-bundle", str(bundle), "delete"]),
        "python -c pass (venv interpreter start)": median_wall([str(VENV_PY), "-c", "pass"]),
        "shim -v (interpreter + entry point)": median_wall([str(SHIM), "-v"]),
        "import of the server modules": median_wall(
            [str(VENV_PY), "-c", "import shim.server, shim.task_service, shim.events, shim.ttrpc"]),
    }


def cold_runs(busybox: Path, runs: int) -> list[float]:
    """revenant with a fresh shim per container (REVENANT_SHIM_SHARED=0): the Python server's start-up
    on every run, as after a lingering shared shim has exited."""
    node = ContainerdNode("cold")
    node.env["REVENANT_SHIM_SHARED"] = "0"
    node.start()
    try:
        image = node.import_image(busybox)
        time_run(node, REVENANT, image, "warm")
        return [time_run(node, REVENANT, image, f"c{i}") for i in range(runs)]
    finally:
        node.destroy()


def pct(values: list[float], q: float) -> float:
    return sorted(values)[min(len(values) - 1, int(q * len(values)))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=30)
    args = ap.parse_args()

    images = build_test_images(Path(tempfile.mkdtemp(prefix="shim-bench-images-")))
    cold = cold_runs(images.busybox, args.runs)
    node = ContainerdNode("bench")
    node.start()
    try:
        image = node.import_image(images.busybox)
        for rt in (RUNC, REVENANT):  # warm caches (page cache, snapshot) for both
            time_run(node, rt, image, "warm")
        times: dict[str, list[float]] = {RUNC: [], REVENANT: []}
        for i in range(args.runs):
            order = (RUNC, REVENANT) if i % 2 == 0 else (REVENANT, RUNC)
            for rt in order:
                times[rt].append(time_run(node, rt, image, f"b{i}"))
        one = {rt: idle_memory(node, rt, image, 1) for rt in (RUNC, REVENANT)}
        ten = {rt: idle_memory(node, rt, image, 10) for rt in (RUNC, REVENANT)}
    finally:
        node.destroy()
    parts = breakdown()

    med = {rt: statistics.median(v) for rt, v in times.items()}
    print(f"runs per runtime: {args.runs}")
    print("| shim | median (ms) | p10 (ms) | p90 (ms) | 1 idle task: shim VmRSS / Pss (MiB) "
          "| 10 idle tasks: shims, total VmRSS / Pss (MiB) |")
    print("|---|---|---|---|---|---|")
    for rt in (RUNC, REVENANT):
        v = times[rt]
        print(f"| {rt} | {med[rt] * 1e3:.0f} | {pct(v, 0.1) * 1e3:.0f} | {pct(v, 0.9) * 1e3:.0f} | "
              f"{one[rt][1] / 1024:.1f} / {one[rt][2] / 1024:.1f} | "
              f"{ten[rt][0]}, {ten[rt][1] / 1024:.1f} / {ten[rt][2] / 1024:.1f} |")
    cold_med = statistics.median(cold)
    print(f"| {REVENANT}, REVENANT_SHIM_SHARED=0 (fresh shim per run; separate node, run before) | "
          f"{cold_med * 1e3:.0f} | {pct(cold, 0.1) * 1e3:.0f} | {pct(cold, 0.9) * 1e3:.0f} | | |")
    print(f"\nratio revenant/runc (median start-to-exit): {med[REVENANT] / med[RUNC]:.2f}"
          f" (fresh shim per container: {cold_med / med[RUNC]:.2f})")
    print("\nrevenant start-up parts (median wall, ms):")
    for name, value in parts.items():
        print(f"  {name}: {value * 1e3:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
