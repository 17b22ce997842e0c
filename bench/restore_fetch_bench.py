"""Store.get of a CRIU-like checkpoint, part by part: file:// and s3:// (SeaweedFS on 127.0.0.1), the S3 pack
reader with and without its planned read-ahead, beside `zstd -d | tar -x` of the same tree.

Each get restores into a fresh directory and is checked byte for byte against the source tree. The parts
are thread time summed over the get's workers (shim.store.get_timing): `overlap` above 1 means they ran
in parallel. The stores' files stay in the page cache (the machine is shared: caches are not dropped),
so this measures the restore's CPU path and the S3 round trips, not a disk. Command:

    .venv/bin/python bench/restore_fetch_bench.py --mib 512 --runs 3
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from harness.servers import S3_ACCESS_KEY, S3_BUCKET, S3_SECRET_KEY, SeaweedS3  # noqa: E402
from harness.store_util import make_tree, tree_digest  # noqa: E402
from shim.store import open_store  # noqa: E402
from shim.store.backends import packs  # noqa: E402
from shim.store.get_timing import GetTimings  # noqa: E402

KEY = "bench/restore/main"


def say(msg: str) -> None:
    print(f"# {msg}", file=sys.stderr, flush=True)


WINDOWS = (packs.READ_WINDOW, packs.CACHED_WINDOWS)
MAIN_WINDOWS = (4 << 20, 8)  # the pack reader before planned read-ahead: 4 MiB windows, 8 cached


def timed_get(url: str, work: Path, want: str, read_ahead: bool, windows: tuple[int, int] = WINDOWS) -> dict[str, Any]:
    packs.READ_WINDOW, packs.CACHED_WINDOWS = windows
    store = open_store(url)
    if not read_ahead:
        store.backend.plan_reads = lambda digests: None  # no plan: no read-ahead, whole windows
    dest = Path(tempfile.mkdtemp(dir=work)) / "out"
    timings = GetTimings()
    t = time.monotonic()
    store.get(KEY, dest, timings=timings)
    wall = time.monotonic() - t
    store.close()
    packs.READ_WINDOW, packs.CACHED_WINDOWS = WINDOWS
    if tree_digest(dest) != want:
        raise SystemExit(f"{url}: the restored tree differs from the source")
    shutil.rmtree(dest.parent)
    return {"wall_s": wall, **timings.as_dict()}


def tar_baseline(src: Path, work: Path) -> float:
    archive = work / "tree.tar.zst"
    subprocess.run(f"tar -C {src} -cf - . | zstd -q -1 -T0 -o {archive}", shell=True, check=True)
    dest = work / "untar"
    dest.mkdir()
    t = time.monotonic()
    subprocess.run(f"zstd -d -c {archive} | tar -C {dest} -xf -", shell=True, check=True)
    wall = time.monotonic() - t
    shutil.rmtree(dest)
    archive.unlink()
    return wall


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mib", type=int, default=256, help="size of the page image in MiB (default 256)")
    ap.add_argument("--runs", type=int, default=3, help="gets per variant, interleaved; medians reported")
    ap.add_argument("--skip-s3", action="store_true")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="rv-fetch-bench-", dir="/var/tmp"))
    seaweed = None
    try:
        src = make_tree(work / "src", seed=7, big_mib=4)
        with open(src / "pages-1.img", "wb") as f:  # the page image: half random, half repetitive
            for _ in range(args.mib // 2):
                f.write(os.urandom(1 << 20))
            f.write(b"repetitive-page\n" * (args.mib << 15))
        want = tree_digest(src)
        urls = {"file://": f"file://{work / 'store'}"}
        if not args.skip_s3:
            os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"] = S3_ACCESS_KEY, S3_SECRET_KEY
            seaweed = SeaweedS3(work / "seaweed")
            seaweed.start()
            urls["s3://"] = f"s3://{S3_BUCKET}/bench?endpoint={seaweed.endpoint}"
        for name, url in urls.items():
            t = time.monotonic()
            open_store(url).put(KEY, src)
            say(f"put into {name}: {time.monotonic() - t:.1f} s")
        variants = [("file://", urls["file://"], True, WINDOWS)]
        if "s3://" in urls:
            variants += [
                ("s3://, planned read-ahead, 8 MiB windows", urls["s3://"], True, WINDOWS),
                ("s3://, no read-ahead, 8 MiB windows", urls["s3://"], False, WINDOWS),
                ("s3://, as before: no read-ahead, 4 MiB windows", urls["s3://"], False, MAIN_WINDOWS),
            ]
        results: dict[str, list[dict[str, Any]]] = {v[0]: [] for v in variants}
        tar: list[float] = []
        for i in range(args.runs):
            for name, url, ahead, windows in variants:
                results[name].append(timed_get(url, work, want, ahead, windows))
                say(f"run {i + 1}: {name} {results[name][-1]['wall_s']:.2f} s")
            tar.append(tar_baseline(src, work))
            say(f"run {i + 1}: zstd -d | tar -x {tar[-1]:.2f} s")
    finally:
        if seaweed is not None:
            seaweed.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    base = statistics.median(tar)
    print(f"\nCommand: .venv/bin/python bench/restore_fetch_bench.py {' '.join(sys.argv[1:])}\n")
    print("| get | wall s (median) | vs zstd -d \\| tar -x | get ms | decode ms | verify ms | write ms | overlap |")
    print("|---|---|---|---|---|---|---|---|")
    for name, runs in results.items():
        med = sorted(runs, key=lambda r: r["wall_s"])[len(runs) // 2]
        print(
            f"| {name} | {med['wall_s']:.2f} | {med['wall_s'] / base:.2f}x | {med['fetch_ms']:.0f} | "
            f"{med['decode_ms']:.0f} | {med['verify_ms']:.0f} | {med['write_ms']:.0f} | {med['overlap']} |"
        )
    print(f"| zstd -d \\| tar -x (zstd -1 archive) | {base:.2f} | 1.00x | | | | | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
