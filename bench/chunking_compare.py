"""Compare chunking strategies on two real CRIU dumps of one process taken before and after a mutation.

Usage: python -m bench.chunking_compare DUMP1 DUMP2 [DUMP1 DUMP2 ...]
For each strategy: chunks of dump 1, bytes of dump 2 that are new (not in dump 1), chunk+hash throughput.
"""

from __future__ import annotations

import mmap
import sys
import time
from pathlib import Path

import blake3
from pyfastcdc import FastCDC

KIB = 1024


def fixed_cuts(buf: memoryview, size: int):
    for off in range(0, len(buf), size):
        yield off, min(size, len(buf) - off)


def cdc_cuts(buf: memoryview, avg: int):
    cdc = FastCDC(avg_size=avg, min_size=avg // 4, max_size=avg * 4)
    for c in cdc.cut_buf(buf):
        yield c.offset, c.length


def chunk_dir(d: Path, cutter) -> tuple[dict[str, int], int, float]:
    digests: dict[str, int] = {}
    total = 0
    t0 = time.perf_counter()
    for f in sorted(d.iterdir()):
        size = f.stat().st_size
        if size == 0:
            continue
        with open(f, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            view = memoryview(mm)
            for off, ln in cutter(view):
                digests[blake3.blake3(view[off : off + ln]).hexdigest()] = ln
                total += ln
            view.release()
    return digests, total, time.perf_counter() - t0


def main(argv: list[str]) -> None:
    sizes = (16 * KIB, 32 * KIB, 64 * KIB, 256 * KIB, 1024 * KIB)
    strategies = [(f"fixed {s // KIB} KiB", lambda b, s=s: fixed_cuts(b, s)) for s in sizes]
    strategies += [(f"FastCDC avg {s // KIB} KiB", lambda b, s=s: cdc_cuts(b, s)) for s in sizes]
    print("| dump pair | strategy | chunks (dump 1) | dump 2 new bytes | new / dump 2 | chunk+hash MB/s |")
    print("|---|---|---|---|---|---|")
    for i in range(0, len(argv), 2):
        d1, d2 = Path(argv[i]), Path(argv[i + 1])
        for name, cutter in strategies:
            first, _total1, t1 = chunk_dir(d1, cutter)
            second, total2, t2 = chunk_dir(d2, cutter)
            new = sum(ln for dg, ln in second.items() if dg not in first)
            mbps = (sum(f.stat().st_size for f in d1.iterdir()) + total2) / (t1 + t2) / 1e6
            pct = 100 * new / total2
            print(
                f"| {d1.parent.name} | {name} | {len(first)} | {new / 1e6:.1f} MB | {pct:.1f}% | {mbps:.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main(sys.argv[1:])
