"""The fixed costs of a restore, outside a memjob: where opening an S3 store and claiming a key go in a
fresh process (as in a fresh shim), and what making a small restored writable layer durable costs right
after a restore wrote 512 MiB of CRIU images to the same disk (syncfs, as before, against fsyncing the
layer's own files and directories, interleaved).

Run: .venv/bin/python bench/restore_fixed_bench.py [--runs 3]   (SeaweedFS S3 on 127.0.0.1; ~1 min)
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

STAGES = r"""
import sys, time
t = time.monotonic()
def mark(what):
    global t
    now = time.monotonic(); print(f"{what}\t{1000 * (now - t):.1f}", flush=True); t = now
import shim.store
mark("import shim.store")
import boto3  # noqa: F401
mark("import boto3")
from shim.store.backends import s3  # noqa: F401
mark("import the s3 backend (botocore)")
st = shim.store.open_store(sys.argv[1])
mark("open_store: the S3 client")
st.claim("bench/fixed", owner="bench")
mark("claim (first requests: list epochs, probe, create)")
st.list("bench/fixed")
mark("list (empty key)")
st.claim("bench/fixed", owner="bench")
mark("claim again (probe cached)")
"""


def stages(url: str, runs: int) -> None:
    rows: dict[str, list[float]] = {}
    for _ in range(runs):
        out = subprocess.run([sys.executable, "-c", STAGES, url], check=True, capture_output=True, text=True, cwd=REPO)
        for line in out.stdout.splitlines():
            what, ms = line.split("\t")
            rows.setdefault(what, []).append(float(ms))
    print("| open + claim stage, fresh process | ms per run |\n|---|---|")
    for what, ms in rows.items():
        print(f"| {what} | {' / '.join(f'{m:.0f}' for m in ms)} |")


def layer_sync(runs: int) -> None:
    import shim.layer as layer

    base = Path(tempfile.mkdtemp(prefix="rv-fixed-", dir="/var/tmp"))
    try:
        up = base / "up"
        (up / "app/logs").mkdir(parents=True)
        for i in range(20):
            (up / "app/logs" / f"log{i}").write_bytes(os.urandom(50_000))
        layer.capture_writable_layer(up, base / "out")
        tar = layer.verify_layer(base / "out")
        buf = os.urandom(1 << 20)
        rows: dict[str, list[float]] = {"syncfs (before)": [], "fsync each (now)": []}
        for run in range(runs):
            for mode in rows:
                layer.FSYNC_EACH_MAX = 0 if mode.startswith("syncfs") else 256
                with open(base / "pages.img", "wb") as f:  # what the fetch leaves dirty
                    for _ in range(512):
                        f.write(buf)
                target = base / f"t{run}{mode[0]}"
                target.mkdir()
                began = time.monotonic()
                layer.apply_writable_layer(tar, target)
                rows[mode].append(1000 * (time.monotonic() - began))
                (base / "pages.img").unlink()
                layer.libc.syncfs(base)
        print("\n| apply a 20-file, 1 MB layer after 512 MiB written | ms per run |\n|---|---|")
        for mode, ms in rows.items():
            print(f"| {mode} | {' / '.join(f'{m:.0f}' for m in ms)} |")
    finally:
        shutil.rmtree(base, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    from harness.servers import S3_ACCESS_KEY, S3_BUCKET, S3_SECRET_KEY, SeaweedS3

    os.environ.update({"AWS_ACCESS_KEY_ID": S3_ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": S3_SECRET_KEY})
    work = Path(tempfile.mkdtemp(prefix="rv-fixed-s3-", dir="/var/tmp"))
    srv = SeaweedS3(work)
    srv.start()
    try:
        print(f"load average before: {os.getloadavg()[0]:.1f}")
        stages(f"s3://{S3_BUCKET}/fixed-{os.getpid()}?endpoint={srv.endpoint}", args.runs)
        layer_sync(args.runs)
        print(f"\nload average after: {os.getloadavg()[0]:.1f}")
    finally:
        srv.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
