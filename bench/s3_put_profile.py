"""Where an S3 put's time goes: one put of a dump directory into SeaweedFS, with the CPU seconds of this
process (chunk, hash, compress, HTTP client) and of the SeaweedFS processes (server + S3 gateway) beside the
wall time, and optionally the same put into a file:// store and a cProfile of the S3 put.

    .venv/bin/python bench/s3_put_profile.py --size 2048 [--dir DUMP] [--local] [--profile N] [--volume-mb 64]

--dir puts an existing directory (e.g. a real CRIU dump); otherwise store_bench's synthetic dump of --size MiB.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import cpu_census  # noqa: E402
from bench.store_bench import make_dump  # noqa: E402
from shim.store import open_store  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def _cpu(pid: int) -> float:
    """User + system CPU seconds of a process and its reaped children."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(x) for x in fields[11:15]) / TICK


def _tree_cpu(pids: list[int]) -> float:
    return sum(_cpu(p) for p in pids)


def _measure(label: str, fn, server_pids: list[int], profile: int) -> None:
    census = cpu_census.Census(os.getpid()).start()
    t0, c0, s0 = time.monotonic(), time.process_time(), _tree_cpu(server_pids)
    prof = cProfile.Profile() if profile else None
    if prof:
        prof.enable()
    info = fn()
    if prof:
        prof.disable()
    wall, cpu, srv = time.monotonic() - t0, time.process_time() - c0, _tree_cpu(server_pids) - s0
    print(f"{label}: {census.stop()}", flush=True)
    up = info.bytes_uploaded
    print(
        f"{label}: wall {wall:.2f} s, client CPU {cpu:.2f} s ({cpu / wall:.2f} cores), "
        f"server CPU {srv:.2f} s ({srv / wall:.2f} cores), {up / 1e6:.0f} MB stored "
        f"({up / 1e6 / wall:.0f} MB/s), load {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    if prof:
        pstats.Stats(prof).sort_stats("cumulative").print_stats(profile)
        pstats.Stats(prof).sort_stats("tottime").print_stats(profile)


def _shim_log(work: Path) -> None:
    """The shim's logging under containerd's debug level: every record of every logger (boto3's included)
    formatted and written to a FIFO that another process (containerd, here cat) reads."""
    import subprocess

    from shim.daemon import shimlog

    fifo = work / "log"
    os.mkfifo(fifo)
    subprocess.Popen(["sh", "-c", f"cat {fifo} > {work / 'shim.log'}"])
    fd = shimlog.open_log_fifo(str(fifo))
    assert fd is not None
    shimlog.setup(fd, True, {"namespace": "bench", "id": "s3prof"})


def _log_lines(work: Path) -> None:
    log = work / "shim.log"
    if log.exists():
        with open(log, "rb") as f:
            lines = sum(1 for _ in f)
        print(f"shim log: {lines} lines, {log.stat().st_size / 1e6:.1f} MB", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=1024, help="MiB of the synthetic dump")
    ap.add_argument("--dir", type=Path, help="put this directory instead")
    ap.add_argument("--random", action="store_true", help="every page random (incompressible, like memjob's)")
    ap.add_argument("--local", action="store_true", help="also put into a file:// store first")
    ap.add_argument("--profile", type=int, default=0, help="print the top N of a cProfile of the S3 put")
    ap.add_argument("--volume-mb", type=int, default=64, help="SeaweedFS volumeSizeLimitMB")
    ap.add_argument(
        "--page-images", action="store_true", help="put as the shim does: criu/pages-*.img deduplicated page by page"
    )
    ap.add_argument(
        "--shim-log",
        action="store_true",
        help="log as a shim started with -debug does: root at DEBUG into a FIFO (shim.daemon.shimlog) drained by cat",
    )
    ap.add_argument("--query", default="", help="appended to the s3:// URL, e.g. '&workers=4'")
    a = ap.parse_args(argv)

    from tests.harness.servers import S3_ACCESS_KEY, S3_SECRET_KEY, SeaweedS3

    os.environ.setdefault("AWS_ACCESS_KEY_ID", S3_ACCESS_KEY)
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", S3_SECRET_KEY)
    work = Path(tempfile.mkdtemp(prefix="s3prof-", dir="/var/tmp"))
    try:
        dump = a.dir
        if dump is None:
            dump = work / "dump"
            if a.random:
                dump.mkdir()
                with open(dump / "pages-1.img", "wb") as f:
                    for _ in range(a.size):
                        f.write(os.urandom(1 << 20))
                (dump / "inventory.img").write_bytes(b"")
            else:
                make_dump(dump, a.size)
        if a.shim_log:
            _shim_log(work)
        pages = ("criu/pages-*.img",) if a.page_images else ()
        total = sum(p.stat().st_size for p in dump.rglob("*") if p.is_file())
        print(f"dump {total / 2**20:.0f} MiB", flush=True)
        if a.local:
            store = open_store(f"file://{work}/store")
            _measure("file:// put", lambda: store.put("bench/job/main", dump, page_images=pages), [], 0)
            store.close()
            shutil.rmtree(work / "store")
        root = work / "srv"
        root.mkdir()
        srv = SeaweedS3(root, volume_max=max(50, total * 3 // (a.volume_mb << 20) + 20))
        if a.volume_mb != 64:
            srv_start = srv.start

            def start() -> None:  # the harness fixes 64 MB volumes: this run's size instead
                import tests.harness.servers as s

                orig = s.subprocess.Popen

                def popen(cmd, *args, **kw):
                    cmd = [f"-master.volumeSizeLimitMB={a.volume_mb}" if "volumeSizeLimitMB" in c else c for c in cmd]
                    return orig(cmd, *args, **kw)

                s.subprocess.Popen = popen
                try:
                    srv_start()
                finally:
                    s.subprocess.Popen = orig

            srv.start = start
        srv.start()
        try:
            pids = [srv.cluster.pid, srv.proc.pid]
            store = open_store(f"s3://revenant-test/prof?endpoint={srv.endpoint}{a.query}")
            _measure("s3:// put", lambda: store.put("bench/job/main", dump, page_images=pages), pids, a.profile)
            store.close()
            vols = len(list((root / "data").rglob("*.dat")))
            print(f"SeaweedFS volumes: {vols} .dat files", flush=True)
            _log_lines(work)
        finally:
            srv.shutdown()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
