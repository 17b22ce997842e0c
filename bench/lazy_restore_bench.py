"""Lazy restore (criu lazy-pages fed by our page server) beside an eager `criu restore`, one process.

    sudo flock /tmp/revenant-heavy.lock .venv/bin/python -m bench.lazy_restore_bench [--mib 1024] [--runs 3]

memjob (tests/images/memjob.c) holding --mib of memory is dumped once by `criu dump`. Each run restores
that dump twice, in alternating order:
  - eager: `criu restore -d` from a full copy of the images dir (the baseline: today the whole
    checkpoint is local before the restore starts);
  - lazy: a copy whose pages files hold only the eager bytes (holes where the lazy pages go), our
    `criu lazy-pages` daemon + page server reading the lazy pages from the full pages file, then
    `criu restore --lazy-pages -d`.
"to running" is from the start (of the daemon, for lazy) to `criu restore` returning with the tree
running; "all pages" is until the daemon has delivered every lazy page and exited; "first step" until the
restored job logs its next step (it checksums all its memory each step, so that needs every page).
Both read local files from the page cache; over a network store the eager side also waits for the
download, the lazy side only for the eager bytes. Prints a markdown table with the ratio lazy/eager.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from harness.images import build_memjob  # noqa: E402
from harness.lazy_images import FileSource, sparse_copy  # noqa: E402
from harness.memjob import read_steps  # noqa: E402
from shim.checkpoint.lazy_daemon import start_lazy_pages  # noqa: E402
from shim.checkpoint.lazy_pages import lazy_plan  # noqa: E402


def wait_step(log: Path, lines: int, timeout: float = 300) -> None:
    """Until the log holds more than `lines` steps (each restore of the one dump logs from the same step)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if len(read_steps(log)) > lines:
            return
        time.sleep(0.005)
    raise TimeoutError(f"memjob logged no step after line {lines}")


def restore(images: Path, work: Path, lazy: bool) -> int:
    pidfile = work / "pid"
    cmd = ["criu", "restore", "-D", str(images), "--work-dir", str(work), "-d", "-o", "restore.log"]
    subprocess.run([*cmd, "--pidfile", str(pidfile), *(["--lazy-pages"] if lazy else [])], check=True, timeout=600)
    return int(pidfile.read_text())


def end(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    while Path(f"/proc/{pid}").exists():
        time.sleep(0.01)


def run_eager(full: Path, tmp: Path, log: Path) -> dict[str, float]:
    images, work = tmp / "eager", tmp / "eager-work"
    shutil.copytree(full, images)
    work.mkdir()
    lines = len(read_steps(log))
    t0 = time.monotonic()
    pid = restore(images, work, lazy=False)
    running = time.monotonic() - t0
    wait_step(log, lines)
    first = time.monotonic() - t0
    end(pid)
    shutil.rmtree(images)
    shutil.rmtree(work)
    return {"running": running, "all": running, "first": first}


def run_lazy(full: Path, tmp: Path, log: Path) -> dict[str, float]:
    images, work = tmp / "lazy", tmp / "lazy-work"
    plan = lazy_plan(full)
    sparse_copy(full, images, plan)
    pid, lines = 0, len(read_steps(log))

    def on_failure(reason: str) -> None:
        if pid:
            os.kill(pid, signal.SIGKILL)

    t0 = time.monotonic()
    daemon = start_lazy_pages(images, work, plan, FileSource(full), on_failure)
    pid = restore(images, work, lazy=True)
    running = time.monotonic() - t0
    daemon.wait(600)
    everything = time.monotonic() - t0
    wait_step(log, lines)
    first = time.monotonic() - t0
    end(pid)
    daemon.kill()
    shutil.rmtree(images)
    shutil.rmtree(work)
    return {"running": running, "all": everything, "first": first}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="lazy-bench-") as d:
        tmp = Path(d)
        memjob, log, full = build_memjob(tmp), tmp / "memjob.log", tmp / "full"
        job = ["--mib", str(args.mib), "--mutate", "0", "--seed", "1", "--interval-ms", "200", "--log", str(log)]
        proc = subprocess.Popen(
            [str(memjob), *job],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        wait_step(log, 0)
        full.mkdir()
        subprocess.run(["criu", "dump", "-t", str(proc.pid), "-D", str(full), "-o", "dump.log"], check=True)
        proc.wait()
        rows: dict[str, list[dict[str, float]]] = {"eager": [], "lazy": []}
        for i in range(args.runs):
            for kind in ("eager", "lazy") if i % 2 == 0 else ("lazy", "eager"):
                fn = run_eager if kind == "eager" else run_lazy
                rows[kind].append(fn(full, tmp, log))
        print(f"memjob {args.mib} MiB, {args.runs} runs each (median s)\n")
        print("| restore | to running | all pages | first step |")
        print("|---|---|---|---|")
        med = {k: {m: statistics.median(r[m] for r in v) for m in ("running", "all", "first")} for k, v in rows.items()}
        for kind, m in med.items():
            print(f"| {kind} | {m['running']:.3f} | {m['all']:.3f} | {m['first']:.3f} |")
        e, z = med["eager"], med["lazy"]
        print(f"| lazy/eager | {z['running'] / e['running']:.2f} | {z['all'] / e['all']:.2f} | "
              f"{z['first'] / e['first']:.2f} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
