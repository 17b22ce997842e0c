"""Where a local put's CPU goes, A/B between two source trees, side by side with tar | zstd -1 -T0.

    sudo .venv/bin/python -m bench.put_cpu_bench [--mib 1024] [--base /work/main] [--rounds 2] [--profile]
        [--mode staged|streamed] [--keep DIR] [--get]

A memjob of --mib MiB is dumped once with `criu dump --leave-running` and staged as the checkpointer
stages it (CRIU images under criu/). Then, alternating, each of --base (the tree before a change) and this
tree puts it into a fresh file:// store with page_images (the checkpointer's setting), each in its own
interpreter (so each imports its own shim): wall time and that process's CPU seconds (user + sys); --mode
streamed puts it through put_growing instead (the checkpointer's default path; the tree already complete).
Both trees' manifests are compared (same chunks, same digests, same page table: expected unless the change
is to how chunks are cut). --get also times each tree's restore of what it put (Store.get into a fresh
directory, in the same interpreter, after the put) and checks the restored files against the dump, beside
`zstd -d | tar -x`. Also measured, once a round: the baseline `tar -c | zstd -1 -T0`; and the floor: one core's
BLAKE3 + zstd -1 over every 64 KiB chunk of the dump (the CPU a put must spend; Podman's export spends
the zstd part only). --profile adds a cProfile of this tree's put (top functions by own time). Prints
markdown; exit 0 (it is a measurement).
"""

from __future__ import annotations

import argparse
import json
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
from harness.memjob import read_steps  # noqa: E402

# Run in a fresh interpreter with the tree under test first on sys.path; prints one JSON line.
CHILD = r"""
import cProfile, io, json, pstats, resource, sys, time
from pathlib import Path
root, src, store_dir, prof, mode = sys.argv[1], Path(sys.argv[2]), sys.argv[3], sys.argv[4] == "1", sys.argv[5]
get_dir = sys.argv[6] if len(sys.argv) > 6 else ""
sys.path.insert(0, root)
import shim
assert shim.__file__.startswith(root), shim.__file__
from shim.protect.checkpointer import PAGE_IMAGES
from shim.store import open_store
st = open_store("file://" + store_dir)
p = cProfile.Profile() if prof else None
r0 = resource.getrusage(resource.RUSAGE_SELF)
t0 = time.perf_counter()
if p: p.enable()
if mode == "streamed":  # the checkpointer's default path, here fed a tree that is already complete
    from shim.store.growing import GrowingTree
    tree = GrowingTree(src, lambda rel: False)
    tree.finish({})
    info = st.put_growing("bench/putcpu", tree, page_images=PAGE_IMAGES)
else:
    info = st.put("bench/putcpu", src, page_images=PAGE_IMAGES)
if p: p.disable()
wall = time.perf_counter() - t0
r1 = resource.getrusage(resource.RUSAGE_SELF)
m = st._load("bench/putcpu", st._committed("bench/putcpu")[info.seq])
files = {e["path"]: e.get("chunks") for e in m.entries if e["type"] == "file"}
files["page table"] = m.page_table
out = {"wall": wall, "user": r1.ru_utime - r0.ru_utime, "sys": r1.ru_stime - r0.ru_stime, "files": files}
if get_dir:
    t0 = time.perf_counter()
    st.get("bench/putcpu", Path(get_dir))
    r2 = resource.getrusage(resource.RUSAGE_SELF)
    out["get_wall"] = time.perf_counter() - t0
    out["get_cpu"] = r2.ru_utime - r1.ru_utime + r2.ru_stime - r1.ru_stime
if p:
    s = io.StringIO()
    pstats.Stats(p, stream=s).sort_stats("tottime").print_stats(14)
    out["profile"] = s.getvalue()
print(json.dumps(out))
"""


def dump(pid: int, out: Path) -> None:
    out.mkdir(parents=True)
    subprocess.run(
        ["criu", "dump", "-t", str(pid), "-D", str(out), "--leave-running", "-o", "dump.log", "-v1"],
        check=True,
        timeout=600,
    )
    (out / "dump.log").unlink()


def make_dump(work: Path, mib: int) -> Path:
    work.mkdir(parents=True, exist_ok=True)
    memjob = build_memjob(work)
    log = work / "memjob.log"
    job = subprocess.Popen(
        [str(memjob), "--mib", str(mib), "--mutate", "0.05", "--seed", "7", "--interval-ms", "4000", "--log", str(log)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        end = time.monotonic() + 300
        while not read_steps(log):
            if time.monotonic() > end:
                raise TimeoutError("memjob did not start")
            time.sleep(0.05)
        dump(job.pid, work / "img")
    finally:
        os.killpg(job.pid, signal.SIGKILL)
        job.wait()
    src = work / "src"
    shutil.copytree(work / "img", src / "criu")
    return src


def put(root: Path, src: Path, work: Path, profile: bool, mode: str = "staged", get: bool = False) -> dict:
    store = Path(tempfile.mkdtemp(prefix="store-", dir=work))
    get_dir = work / f"get-{store.name}" if get else None
    orig = src
    if mode == "streamed":  # a streamed put punches what it consumed out of its source: give it a copy
        src = Path(shutil.copytree(src, work / f"src-{store.name}"))
        for f in src.rglob("*"):  # written back before the clock starts, as the staged source is
            if f.is_file():
                fd = os.open(f, os.O_RDONLY)
                os.fsync(fd)
                os.close(fd)
    r = subprocess.run(
        [sys.executable, "-c", CHILD, str(root), str(src), str(store), "1" if profile else "0", mode]
        + ([str(get_dir)] if get_dir else []),
        check=True,
        capture_output=True,
        text=True,
    )
    shutil.rmtree(store)
    out = json.loads(r.stdout.strip().splitlines()[-1])
    if get_dir is not None:
        out["get_same"] = same_files(orig, get_dir)
        shutil.rmtree(get_dir)
    if mode == "streamed":
        shutil.rmtree(src)
    return out


def same_files(a: Path, b: Path) -> bool:
    """Every regular file of a in b with the same bytes (read in 16 MiB pieces)."""
    for f in a.rglob("*"):
        if not f.is_file():
            continue
        g = b / f.relative_to(a)
        if not g.is_file() or g.stat().st_size != f.stat().st_size:
            return False
        with f.open("rb") as x, g.open("rb") as y:
            while piece := x.read(16 << 20):
                if piece != y.read(len(piece)):
                    return False
    return True


def timed_shell(cmd: str) -> tuple[float, float]:
    """Run a shell pipeline: its wall time and its children's CPU seconds (user + sys)."""
    r0 = os.times()
    t0 = time.perf_counter()
    subprocess.run(cmd, shell=True, check=True)
    wall = time.perf_counter() - t0
    r1 = os.times()
    return wall, (r1.children_user - r0.children_user) + (r1.children_system - r0.children_system)


def untar_zstd(src: Path, work: Path) -> tuple[float, float]:
    """`zstd -d | tar -x` of the baseline archive of src (made outside the clock): wall, children's CPU."""
    archive, dest = work / "baseline-get.tar.zst", work / "untar"
    subprocess.run(f"tar -C {src} -c . | zstd -q -1 -T0 -o {archive}", shell=True, check=True)
    dest.mkdir()
    result = timed_shell(f"zstd -q -d -c {archive} | tar -C {dest} -x")
    archive.unlink()
    shutil.rmtree(dest)
    return result


def tar_zstd(src: Path, work: Path) -> tuple[float, float]:
    out = work / "baseline.tar.zst"
    result = timed_shell(f"tar -C {src} -c . | zstd -q -1 -T0 -o {out}")
    out.unlink()
    return result


def floor(src: Path) -> tuple[float, float, int]:
    """One core's CPU seconds for BLAKE3 and for zstd -1 over every 64 KiB of the dump, and its bytes."""
    import blake3
    import zstandard

    comp = zstandard.ZstdCompressor(level=1)
    h = z = 0.0
    total = 0
    for f in sorted(src.rglob("*")):
        if not f.is_file():
            continue
        data = f.read_bytes()
        total += len(data)
        view = memoryview(data)
        t0 = time.thread_time()
        for i in range(0, len(view), 65536):
            blake3.blake3(view[i : i + 65536], max_threads=1).digest()
        t1 = time.thread_time()
        for i in range(0, len(view), 65536):
            comp.compress(view[i : i + 65536])
        z += time.thread_time() - t1
        h += t1 - t0
    return h, z, total


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--base", type=Path, default=Path("/work/main"))
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--keep", type=Path, help="reuse/keep the staged dump in this directory")
    ap.add_argument(
        "--mode",
        choices=("staged", "streamed"),
        default="staged",
        help="Store.put, or put_growing of the finished tree",
    )
    ap.add_argument("--get", action="store_true", help="also time each tree's restore, beside zstd -d | tar -x")
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="rv-putcpu-", dir="/var/tmp"))
    try:
        if args.keep and (args.keep / "src").is_dir():
            src = args.keep / "src"
        else:
            src = make_dump(args.keep or work, args.mib)
        size = sum(f.stat().st_size for f in src.rglob("*") if f.is_file())
        print(f"\ndump {size / 1e6:.1f} MB, load average {os.getloadavg()[0]:.1f}\n")
        rows: dict[str, list[dict]] = {"base": [], "this": []}
        tars: list[tuple[float, float]] = []
        untars: list[tuple[float, float]] = []
        for _ in range(args.rounds):  # alternating, the baseline in every round: the VM is noisy
            for name, root in (("base", args.base), ("this", ROOT)):
                rows[name].append(put(root, src, work, False, args.mode, args.get))
            tars.append(tar_zstd(src, work))
            if args.get:
                untars.append(untar_zstd(src, work))
        tw = statistics.median(w for w, _c in tars)
        tc = statistics.median(c for _w, c in tars)
        same = all(r["files"] == rows["base"][0]["files"] for name in rows for r in rows[name])
        print(
            f"| {args.mode} put (file://, page_images) | wall s (each round) | CPU s user+sys (each round)"
            " | median wall / CPU |"
        )
        print("|---|---|---|---|")
        for name in ("base", "this"):
            walls = " / ".join(f"{r['wall']:.2f}" for r in rows[name])
            cpus = " / ".join(f"{r['user'] + r['sys']:.2f}" for r in rows[name])
            mw = statistics.median(r["wall"] for r in rows[name])
            mc = statistics.median(r["user"] + r["sys"] for r in rows[name])
            print(f"| {name} | {walls} | {cpus} | {mw:.2f} / {mc:.2f} ({mw / tw:.2f}x / {mc / tc:.2f}x tar) |")
        walls = " / ".join(f"{w:.2f}" for w, _c in tars)
        cpus = " / ".join(f"{c:.2f}" for _w, c in tars)
        print(f"| tar \\| zstd -1 -T0 | {walls} | {cpus} | {tw:.2f} / {tc:.2f} |")
        print(f"\nsame manifest references (every round, both trees): {same}")
        if args.get:
            uw = statistics.median(w for w, _c in untars)
            uc = statistics.median(c for _w, c in untars)
            print("\n| get (file://) | wall s (each round) | CPU s (each round) | median wall / CPU | same bytes |")
            print("|---|---|---|---|---|")
            for name in ("base", "this"):
                walls = " / ".join(f"{r['get_wall']:.2f}" for r in rows[name])
                cpus = " / ".join(f"{r['get_cpu']:.2f}" for r in rows[name])
                mw = statistics.median(r["get_wall"] for r in rows[name])
                mc = statistics.median(r["get_cpu"] for r in rows[name])
                ok = all(r["get_same"] for r in rows[name])
                ratio = f"({mw / uw:.2f}x / {mc / uc:.2f}x untar)"
                print(f"| {name} | {walls} | {cpus} | {mw:.2f} / {mc:.2f} {ratio} | {ok} |")
            walls = " / ".join(f"{w:.2f}" for w, _c in untars)
            cpus = " / ".join(f"{c:.2f}" for _w, c in untars)
            print(f"| zstd -d \\| tar -x | {walls} | {cpus} | {uw:.2f} / {uc:.2f} | |")
        h, z, total = floor(src)
        gib = total / (1 << 30)
        print(
            f"floor, one core: BLAKE3 {h:.2f} s + zstd -1 {z:.2f} s over {total / 1e6:.1f} MB"
            f" = {(h + z) / gib:.2f} CPU s/GiB; on 2 cores >= {(h + z) / 2:.2f} s wall"
        )
        print(f"load average after: {os.getloadavg()[0]:.1f}")
        if args.profile:
            print("\n```\n" + put(ROOT, src, work, True, args.mode)["profile"] + "```")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
