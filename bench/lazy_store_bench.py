"""Lazy restore, the store side: Store.get_deferred with all of pages-1.img deferred vs a plain Store.get, and a
DeferredReader walking the deferred file in CRIU-sized requests, against SeaweedFS S3 on 127.0.0.1.

The dump is store_bench's CRIU-like one (pages-1.img of --mib MiB: half random, a quarter zero, a quarter
repetitive in 256 KiB runs, plus small image files). Each round, in alternating order and each with a fresh
Store (no client-side cache carried over):
  get       plain Store.get of the checkpoint (what a restore waits for today before `runc restore`)
  deferred  get_deferred with every byte of pages-1.img deferred: what a lazy restore waits for before CRIU
            starts; then a sequential walk of the whole file in --request-pages requests (what CRIU's
            lazy-pages daemon's background walk asks), timed end to end with each request's bytes hashed
            (BLAKE3, about what copying them into the process costs), the hash checked against the source
Reports the best round of each: wall seconds, get_deferred / get, the walk's MB/s vs get's MB/s, and the
reader's stats. SeaweedFS keeps its files in the page cache (the machine is shared: caches are not dropped).

    flock /tmp/revenant-heavy.lock .venv/bin/python bench/lazy_store_bench.py --mib 1024 --rounds 2
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import blake3

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from bench.store_bench import make_dump, seaweed_volumes  # noqa: E402
from harness.servers import S3_ACCESS_KEY, S3_BUCKET, S3_SECRET_KEY, SeaweedS3  # noqa: E402
from shim.store import open_store  # noqa: E402

KEY = "bench/lazy/main"
PAGES = "pages-1.img"
PAGE = 4096


def say(msg: str) -> None:
    print(f"# {msg}", file=sys.stderr, flush=True)


def plain_get(url: str, dest: Path) -> dict[str, Any]:
    store = open_store(url)
    t = time.perf_counter()
    store.get(KEY, dest)
    wall = time.perf_counter() - t
    store.close()
    shutil.rmtree(dest)
    return {"get_s": wall}


def deferred_get(url: str, dest: Path, source: Path, request: int, memory: int) -> dict[str, Any]:
    size = source.stat().st_size
    store = open_store(url)
    t = time.perf_counter()
    _info, reader = store.get_deferred(
        KEY, dest, lambda p: p == PAGES, lambda _root: {PAGES: [(0, size)]}, memory_limit=memory
    )
    ready = time.perf_counter() - t
    digest = blake3.blake3()
    with reader:
        t = time.perf_counter()
        for pos in range(0, size, request):
            digest.update(reader.read(PAGES, pos, min(request, size - pos)))
        walk_s = time.perf_counter() - t
        stats = reader.stats()
    want = blake3.blake3()
    with open(source, "rb") as f:
        while block := f.read(16 << 20):
            want.update(block)
    if digest.digest() != want.digest():
        raise SystemExit("the deferred reads differ from the source")
    store.close()
    shutil.rmtree(dest)
    return {"ready_s": ready, "walk_s": walk_s, "stats": stats}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=256, help="pages-1.img size in MiB (default 256)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--request-pages", type=int, default=64, help="pages per reader request (default 64)")
    ap.add_argument("--memory-mib", type=int, default=64, help="the reader's memory bound (default 64)")
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="lazy-bench-"))
    seaweed = None
    try:
        dump = work / "dump"
        make_dump(dump, args.mib)
        os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"] = S3_ACCESS_KEY, S3_SECRET_KEY
        seaweed = SeaweedS3(work / "seaweed", volume_max=seaweed_volumes(args.mib << 20))
        seaweed.start()
        url = f"s3://{S3_BUCKET}/bench?endpoint={seaweed.endpoint}"
        t = time.perf_counter()
        open_store(url).put(KEY, dump)
        say(f"put {args.mib} MiB into SeaweedFS: {time.perf_counter() - t:.1f} s")
        gets: list[dict[str, Any]] = []
        lazies: list[dict[str, Any]] = []
        for r in range(args.rounds):
            order = ["get", "deferred"] if r % 2 == 0 else ["deferred", "get"]
            for what in order:
                if what == "get":
                    gets.append(plain_get(url, work / "restored"))
                    say(f"round {r}: get {gets[-1]['get_s']:.2f} s")
                else:
                    lazies.append(
                        deferred_get(url, work / "lazy", dump / PAGES, args.request_pages * PAGE, args.memory_mib << 20)
                    )
                    say(f"round {r}: deferred ready {lazies[-1]['ready_s']:.3f} s, walk {lazies[-1]['walk_s']:.2f} s")
        get_s = min(g["get_s"] for g in gets)
        best = min(lazies, key=lambda d: d["ready_s"] + d["walk_s"])
        ready_s = min(d["ready_s"] for d in lazies)
        walk_s = min(d["walk_s"] for d in lazies)
        mb = (dump / PAGES).stat().st_size / 1e6
        total_mb = sum(p.stat().st_size for p in dump.iterdir()) / 1e6
        print(f"| s3 (SeaweedFS), {args.mib} MiB pages-1.img, best of {args.rounds} | seconds | vs plain get |")
        print("|---|---|---|")
        print(f"| plain get (whole checkpoint, {total_mb:.0f} MB) | {get_s:.2f} | 1.00 ({total_mb / get_s:.0f} MB/s) |")
        print(f"| get_deferred, all of {PAGES} deferred (wait before CRIU) | {ready_s:.3f} | {ready_s / get_s:.3f} |")
        print(
            f"| reader walk of {PAGES}, {args.request_pages}-page requests | {walk_s:.2f} | "
            f"{walk_s / get_s:.2f} ({mb / walk_s:.0f} MB/s vs {total_mb / get_s:.0f}) |"
        )
        print(
            f"| get_deferred + walk | {best['ready_s'] + best['walk_s']:.2f} | "
            f"{(best['ready_s'] + best['walk_s']) / get_s:.2f} |"
        )
        print(f"\nreader stats (best round): {best['stats']}")
        return 0
    finally:
        if seaweed is not None:
            seaweed.shutdown()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
