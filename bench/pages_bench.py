"""Page-granular incremental checkpoints vs FastCDC alone, on real CRIU dumps of a memjob.

    sudo .venv/bin/python -m bench.pages_bench [--mib 256]

memjob (tests/images/memjob.c, built static here) runs on the host as its own session; `criu dump
--leave-running` takes dump 1, and, one memjob step later (the job rewrites 5 % of its pages, single pages
at pseudo-random positions), dump 2. Rows, each a first put of dump 1 then a second put:
  - runs: dump 1 with 5 % of its pages rewritten with random data in 64-page runs
  - scattered: dump 1 with 5 % of its pages rewritten one by one at random positions
  - memjob step: dump 2 (what the job itself changed, with whatever moved between the dumps)
  - shifted: the scattered row with 3 pages inserted at the front of pages-*.img (mappings moved)
Each into fresh local stores: with page_images (this store's checkpointer setting) and FastCDC only.
"Second put" counts the chunks uploaded plus the manifest. Floor = changed bytes / first put's bytes.
Prints a markdown table; exit status 0 even when a target is missed (it is a measurement).
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from harness.images import build_memjob  # noqa: E402
from harness.memjob import read_steps  # noqa: E402
from shim.protect.checkpointer import PAGE_IMAGES  # noqa: E402
from shim.store import open_store  # noqa: E402

PAGE = 4096
KEY = "bench/pages/main"


def dump(pid: int, out: Path) -> None:
    out.mkdir(parents=True)
    subprocess.run(
        ["criu", "dump", "-t", str(pid), "-D", str(out), "--leave-running", "-o", "dump.log", "-v1"],
        check=True,
        timeout=600,
    )
    (out / "dump.log").unlink()


def wait_step(log: Path, after: int, timeout: float = 120) -> int:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        steps = read_steps(log)
        if steps and steps[-1].n > after:
            return steps[-1].n
        time.sleep(0.02)
    raise TimeoutError(f"memjob did not pass step {after}")


def checkpoint_dir(images: Path, dest: Path) -> Path:
    """A checkpoint's layout as the checkpointer stages it: CRIU images under criu/."""
    shutil.copytree(images, dest / "criu")
    return dest


def page_files(d: Path) -> list[Path]:
    return sorted((d / "criu").glob("pages-*.img"))


def rewrite(d: Path, run: int, seed: int) -> int:
    """Rewrite 5 % of the non-empty pages of d's page images with random data in runs; returns bytes."""
    rng = random.Random(seed)
    changed = 0
    for f in page_files(d):
        n = f.stat().st_size // PAGE
        if n < run * 4:
            continue
        with open(f, "r+b") as fh:
            for s in rng.sample(range(n // run), int(n * 0.05) // run):
                fh.seek(s * run * PAGE)
                fh.write(rng.randbytes(run * PAGE))
                changed += run * PAGE
    return changed


def shift(d: Path, pages: int) -> None:
    f = max(page_files(d), key=lambda p: p.stat().st_size)
    data = f.read_bytes()
    f.write_bytes(os.urandom(pages * PAGE) + data)


def changed_bytes(a: Path, b: Path) -> int:
    """Pages of b's page images whose content is not anywhere in a's (what any store must upload)."""
    import blake3

    def hashes(d: Path) -> list[bytes]:
        out = []
        for f in page_files(d):
            data = f.read_bytes()
            out += [blake3.blake3(data[i : i + PAGE]).digest() for i in range(0, len(data), PAGE)]
        return out

    old = set(hashes(a))
    return sum(PAGE for h in hashes(b) if h not in old)


def second_put_bytes(store_url: str, a: Path, b: Path, page_images: tuple[str, ...]) -> tuple[int, int, float]:
    """(first put's bytes, second put's bytes incl. manifest, second put seconds) into a fresh store."""
    store = open_store(store_url)
    first = store.put(KEY, a, page_images=page_images)
    t = time.perf_counter()
    second = store.put(KEY, b, page_images=page_images)
    took = time.perf_counter() - t
    manifest = len(store.backend.get_manifest(KEY, second.name))
    first_manifest = len(store.backend.get_manifest(KEY, first.name))
    dest = Path(tempfile.mkdtemp(prefix="rv-pages-get-")) / "out"
    store.get(KEY, dest)
    for f in b.rglob("*"):
        if f.is_file() and f.read_bytes() != (dest / f.relative_to(b)).read_bytes():
            raise AssertionError(f"restore differs: {f}")
    shutil.rmtree(dest.parent)
    return first.bytes_uploaded + first_manifest, second.bytes_uploaded + manifest, took


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=256, help="memjob size in MiB (default 256)")
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="rv-pages-bench-", dir="/var/tmp"))
    job = None
    try:
        memjob = build_memjob(work)
        log = work / "memjob.log"
        job_args = ["--interval-ms", "4000", "--log", str(log)]
        job = subprocess.Popen(
            [str(memjob), *("--mib", str(args.mib), "--mutate", "0.05", "--seed", "7"), *job_args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        step = wait_step(log, 0)
        dump(job.pid, work / "img1")
        if wait_step(log, step) != step + 1:
            raise RuntimeError("memjob moved more than one step between the dumps: retry on a quieter machine")
        dump(job.pid, work / "img2")
        a = checkpoint_dir(work / "img1", work / "a")
        cases: list[tuple[str, Path]] = []
        for name, run in (("5 % as 64-page runs", 64), ("5 % as scattered single pages", 1)):
            d = checkpoint_dir(work / "img1", work / f"b-{run}")
            rewrite(d, run, seed=run)
            cases.append((name, d))
        d = checkpoint_dir(work / "img1", work / "b-shift")
        rewrite(d, 1, seed=1)
        shift(d, 3)
        cases.append(("scattered, mapping shifted by 3 pages", d))
        cases.append(("one memjob step between two real dumps", checkpoint_dir(work / "img2", work / "b-step")))
        size = sum(f.stat().st_size for f in a.rglob("*") if f.is_file())
        print(f"\nmemjob {args.mib} MiB, dump {size / 1e6:.1f} MB ({len(page_files(a))} page images)\n")
        print("| second checkpoint | changed | floor | pages: 2nd put | vs floor | FastCDC only: 2nd put | vs floor |")
        print("|---|---|---|---|---|---|---|")
        for name, b in cases:
            changed = changed_bytes(a, b)
            first_p, second_p, t_p = second_put_bytes(f"file://{work}/store-pages-{b.name}", a, b, PAGE_IMAGES)
            first_c, second_c, t_c = second_put_bytes(f"file://{work}/store-cdc-{b.name}", a, b, ())
            floor = changed / first_p
            pages = f"{second_p / 1e6:.2f} MB = {second_p / first_p:.1%} in {t_p:.2f} s"
            cdc = f"{second_c / 1e6:.2f} MB = {second_c / first_c:.1%} in {t_c:.2f} s"
            vs_cdc = second_c / first_c / (changed / first_c)
            print(
                f"| {name} | {changed / 1e6:.2f} MB | {floor:.1%} of {first_p / 1e6:.0f} MB "
                f"| {pages} | {second_p / first_p / floor:.2f}x | {cdc} | {vs_cdc:.2f}x |"
            )
    finally:
        if job is not None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
