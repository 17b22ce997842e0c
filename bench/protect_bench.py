"""Protection benchmark: transparent protection against the stock tools, side by side in one run.

1. freeze: a periodic (leave-running) checkpoint through revenant (`revenant checkpoint`, dump staged
   in /dev/shm, upload after the task runs on) vs `runc checkpoint --leave-running` of the same job into
   a directory on local disk; the peak extra memory staging costs (/dev/shm growth, sampled).
2. restore: `ctr run` of the same key on node B (Create to running, restored from the file:// store)
   vs `zstd -d | tar -x` of a runc dump followed by `runc restore --detach`.
3. Podman 4.3.1 on the same job: `checkpoint --export --compress=zstd --leave-running` and
   `restore --import` (skipped with the reason when podman is not installed).
4. notice-to-committed: AWS spot notice from the local metadata server -> a real `revenant agent` ->
   final checkpoint committed into the S3 server (SeaweedFS).
5. a run of N steps interrupted K times (final checkpoint + `ctr run` on the other node) vs the same run
   uninterrupted: wall overhead and steps lost.

Freeze only, several alternating pairs (medians, and the frozen window part by part beside runc's):
`--freeze-repeat 5 --skip restore --skip podman --skip s3 --skip run`.

The restore rows are split part by part (the shim's `restore` breakdown beside the stock restore's);
`--store s3` checkpoints into and restores from SeaweedFS S3 on 127.0.0.1 instead of file://.

Run: .venv/bin/python bench/protect_bench.py [--mib 128] ;  --gib 4 for the target's figures (wrap it in
`flock /tmp/revenant-heavy.lock`). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import stat
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from harness.containerd import VENV_BIN, ContainerdNode  # noqa: E402
from harness.images import build_test_images  # noqa: E402
from harness.memjob import LOG_IN_CONTAINER, Step, assert_continuous, read_steps, wait_for_step  # noqa: E402
from harness.metadata_server import MetadataServer  # noqa: E402
from harness.protect import (  # noqa: E402
    AgentProcess,
    Job,
    job_log,
    registry_record,
    run_job,
    shim_log,
    store_checkpoints,
    task_status,
    wait_stopped,
)
from harness.wait import wait_until  # noqa: E402
from shim.checkpoint.criu_stats import read_dump_stats, read_restore_stats  # noqa: E402
from shim.protect.freeze import PARTS  # noqa: E402
from shim.protect.restore_breakdown import PARTS as RESTORE_PARTS  # noqa: E402

ROWS: list[tuple[str, str, str, str]] = []  # (measure, revenant, peer, note)


def say(msg: str) -> None:
    print(f"# {msg}", file=sys.stderr, flush=True)


def row(measure: str, revenant: str, peer: str, note: str = "") -> None:
    ROWS.append((measure, revenant, peer, note))
    say(f"{measure}: revenant {revenant} | peer {peer} {note}")


def memjob_cmd(mib: int, seed: int, interval_ms: int = 100, steps: int = 0) -> list[str]:
    cmd = [
        "/bin/memjob",
        "--mib",
        str(mib),
        "--mutate",
        "0.05",
        "--seed",
        str(seed),
        "--interval-ms",
        str(interval_ms),
        "--log",
        LOG_IN_CONTAINER,
    ]
    return cmd + (["--steps", str(steps)] if steps else [])


def revenant_cli(*args: str) -> dict[str, Any]:
    out = subprocess.run([str(VENV_BIN / "revenant"), *args], capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        raise RuntimeError(f"revenant {' '.join(args)}: {out.stderr or out.stdout}")
    return json.loads(out.stdout)


class ShmPeak(threading.Thread):
    """Peak growth of /dev/shm usage over a baseline while it runs (the staging's memory cost)."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.base = shutil.disk_usage("/dev/shm").used
        self.peak = 0
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.wait(0.02):
            self.peak = max(self.peak, shutil.disk_usage("/dev/shm").used - self.base)


def _cachestat(fd: int) -> tuple[int, int, int]:
    """(resident, dirty, writeback) pages of an open file: cachestat(2), Linux 6.5+, x86-64 and arm64."""
    import ctypes

    rng = (ctypes.c_uint64 * 2)(0, 0)  # offset 0, length 0: to the end of the file
    out = (ctypes.c_uint64 * 5)()
    nr = 451
    if ctypes.CDLL(None, use_errno=True).syscall(nr, fd, ctypes.byref(rng), ctypes.byref(out), 0) != 0:
        raise OSError(ctypes.get_errno(), "cachestat")
    return out[0], out[1], out[2]


class CheckpointMemory(threading.Thread):
    """Peak extra memory of the checkpoints of one shim, sampled every 20 ms:
    RSS of the shim and its children (runc, CRIU; the job's own processes excluded) over the shim's
    RSS before, + tmpfs blocks of its staging entries + dirty and writeback pages of its disk-staged
    files (page cache that cannot be reclaimed before writeback). Also kept: the resident (clean
    included) page cache and the disk blocks of its staging."""

    def __init__(self, shim_pid: int, job_pids: set[int], roots: list[Path]) -> None:
        super().__init__(daemon=True)
        import psutil

        self.shim = psutil.Process(shim_pid)
        self.job_pids = job_pids
        self.roots = roots
        self.base = self._rss()
        self.peak = self.peak_rss = self.peak_tmpfs = self.peak_dirty = self.peak_cache = self.peak_disk = 0
        self.halt = threading.Event()

    def _rss(self) -> int:
        import psutil

        total = 0
        for p in [self.shim, *self.shim.children(recursive=True)]:
            if p.pid in self.job_pids:
                continue
            try:
                total += p.memory_info().rss
            except psutil.Error:
                continue
        return total

    def _staged(self) -> tuple[int, int, int, int]:
        """(tmpfs bytes, dirty+writeback bytes, resident page cache bytes, disk bytes) of the staging."""
        tmpfs = dirty = cache = disk = 0
        prefix = f"{self.shim.pid}-"
        for root in self.roots:
            shm = str(root).startswith("/dev/shm")
            try:
                paths = [p for entry in root.glob(f"{prefix}*") for p in entry.rglob("*")]
            except OSError:  # removed while listed (the checkpoint ended)
                continue
            for path in paths:
                try:
                    st = os.lstat(path)
                    if not stat.S_ISREG(st.st_mode):
                        continue
                    if shm:
                        tmpfs += st.st_blocks * 512
                        continue
                    disk += st.st_blocks * 512
                    fd = os.open(path, os.O_RDONLY)
                    try:
                        res, dty, wb = _cachestat(fd)
                    finally:
                        os.close(fd)
                    dirty += (dty + wb) * 4096
                    cache += res * 4096
                except OSError:
                    continue
        return tmpfs, dirty, cache, disk

    def run(self) -> None:
        while not self.halt.wait(0.02):
            try:
                rss = max(0, self._rss() - self.base)
            except Exception:
                continue
            tmpfs, dirty, cache, disk = self._staged()
            self.peak = max(self.peak, rss + tmpfs + dirty)
            self.peak_rss = max(self.peak_rss, rss)
            self.peak_tmpfs = max(self.peak_tmpfs, tmpfs)
            self.peak_dirty = max(self.peak_dirty, dirty)
            self.peak_cache = max(self.peak_cache, cache)
            self.peak_disk = max(self.peak_disk, disk)


def shim_pid_of(node: ContainerdNode, cid: str) -> int:
    import psutil

    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info["cmdline"] or []
        if any("containerd-shim-revenant" in c for c in cmd[:2]) and cid in cmd and node.address in cmd:
            return p.pid
    raise RuntimeError(f"no shim of {cid} found")


def bench_checkpoint_memory(a: ContainerdNode, image: str, mib: int, store: str, repeat: int, budget_mib: int) -> None:
    """The peak extra memory of a periodic checkpoint, streamed vs the whole dump staged in /dev/shm,
    two jobs of the same size on node A checkpointed in alternation."""
    import psutil

    jobs: dict[str, Job] = {}
    for mode, budget in (("staged", 0), ("streamed", budget_mib)):
        a.write_revenant_config(extra=f"stream_budget_mib = {budget}")  # read by the job's shim at Create
        jobs[mode] = Job(f"mem-{mode}", f"bench/memory-{mode}/main", store, mib=mib, interval="off")
        run_job(a, image, jobs[mode], command=memjob_cmd(mib, 7 if mode == "staged" else 8))
    a.write_revenant_config()
    results: dict[str, list[tuple[CheckpointMemory, dict[str, Any]]]] = {m: [] for m in jobs}
    roots = [Path("/dev/shm/revenant"), a.revenant_scratch]
    try:
        for job in jobs.values():
            wait_for_step(job_log(a, job.cid), 3, timeout=300)
        for i in range(repeat):
            for mode, job in jobs.items():
                shim = shim_pid_of(a, job.cid)
                init = psutil.Process(int(a.ctr("task", "ls").stdout.split(job.cid)[1].split()[0]))
                job_pids = {init.pid, *(p.pid for p in init.children(recursive=True))}
                meter = CheckpointMemory(shim, job_pids, roots)
                meter.start()
                res = revenant_cli("checkpoint", job.cid, "--run-dir", str(a.revenant_run_dir), "--json")
                meter.halt.set()
                meter.join()
                memcg = res["dump_memcg"] = dump_memcg(store, job.key)
                results[mode].append((meter, res))
                fr = res.get("freeze") or {}
                say(
                    f"memory {i + 1}/{repeat} {mode}: peak {mib_s(meter.peak)} (rss {mib_s(meter.peak_rss)}, "
                    f"tmpfs {mib_s(meter.peak_tmpfs)}, dirty {mib_s(meter.peak_dirty)}), "
                    f"uploaded {mib_s(res.get('bytes_uploaded', 0))} of {mib_s(res.get('bytes_read', 0))}, "
                    + (
                        f"dump cgroup peak {mib_s(memcg['peak_bytes'])} of {mib_s(memcg['limit_bytes'])} "
                        f"({memcg['oom_kills']} OOM kills), "
                        if memcg
                        else ""
                    )
                    + f"frozen {res['freeze_s']:.2f} s "
                    f"(memdrain {fr.get('criu_memdrain_ms', 0):.0f} ms, "
                    f"memwrite {fr.get('criu_memwrite_ms', 0):.0f} ms), "
                    f"committed {res['total_s']:.2f} s"
                )
        for mode, runs in results.items():
            peak = statistics.median(m.peak for m, _ in runs)
            pairs = " ".join(f"{r['freeze_s']:.2f}/{r['total_s']:.2f}" for _, r in runs)
            uploads = " ".join(f"{r.get('bytes_uploaded', 0) / max(1, r.get('bytes_read', 1)):.1%}" for _, r in runs)
            cgroups = [r["dump_memcg"] for _, r in runs]
            cg_peaks = " ".join(mib_s(c["peak_bytes"]) for c in cgroups if c)
            row(
                f"peak extra memory of a checkpoint ({mib} MiB job), {mode}"
                + (f" (budget {budget_mib} MiB)" if mode == "streamed" else " (/dev/shm)"),
                mib_s(peak),
                "-",
                f"median of {len(runs)}: shim tree RSS {mib_s(statistics.median(m.peak_rss for m, _ in runs))}, "
                f"tmpfs {mib_s(statistics.median(m.peak_tmpfs for m, _ in runs))}, "
                f"dirty+writeback {mib_s(statistics.median(m.peak_dirty for m, _ in runs))}; "
                f"resident page cache {mib_s(statistics.median(m.peak_cache for m, _ in runs))}, "
                f"disk {mib_s(statistics.median(m.peak_disk for m, _ in runs))}; "
                f"frozen {statistics.median(r['freeze_s'] for _, r in runs):.2f} s, "
                f"committed in {statistics.median(r['total_s'] for _, r in runs):.2f} s "
                f"(frozen/committed s per run: {pairs}); uploaded/read per run (the first full, then "
                f"incremental): {uploads}"
                + (f"; dump cgroup peaks {cg_peaks} of {mib_s(cgroups[0]['limit_bytes'])}" if cg_peaks else ""),
            )
    finally:
        for job in jobs.values():
            a.ctr("task", "kill", "-s", "SIGKILL", job.cid, check=False, input="")
            wait_until(lambda job=job: task_status(a, job.cid) != "RUNNING", 60, "job stopped")
            a.ctr("task", "rm", "-f", job.cid, check=False, input="")
            a.ctr("containers", "rm", job.cid, check=False, input="")


def dump_memcg(store: str, key: str) -> dict[str, int] | None:
    """The newest checkpoint's dump memory cgroup report (shim.runc.memcg), if it streamed under one."""
    infos = store_checkpoints(store, key)
    return max(infos, key=lambda i: i.seq).metadata.get("dump_memcg") if infos else None


def runc_root(node: ContainerdNode) -> Path:
    return node.runc_root / node.namespace  # the stock shim's runc root: --runc-root/<namespace>


def mib_s(n: float) -> str:
    return f"{n / 2**20:.0f} MiB"


def stock_breakdown(wall_s: float, st: Any) -> dict[str, float]:
    """`runc checkpoint --leave-running`'s wall time split like revenant's frozen window
    (shim.protect.freeze): runc's own part and CRIU's phases from its stats-dump."""
    ms = {"total_ms": wall_s * 1000}
    if st is None:
        return {**ms, "runc_own_ms": wall_s * 1000}
    frozen = st.frozen_time_us / 1000
    return {
        **ms,
        "runc_own_ms": wall_s * 1000 - st.freezing_time_us / 1000 - frozen,
        "criu_freezing_ms": st.freezing_time_us / 1000,
        "criu_memdrain_ms": (st.memdump_time_us - st.memwrite_time_us) / 1000,  # memdump contains memwrite
        "criu_memwrite_ms": st.memwrite_time_us / 1000,
        "criu_frozen_other_ms": frozen - st.memdump_time_us / 1000,
    }


def freeze_breakdown_rows(revs: list[dict[str, float]], stocks: list[dict[str, float]]) -> None:
    """One row per part of the frozen window: revenant's median beside stock runc's (same run)."""
    if not all(revs):
        row("freeze breakdown", "the shim sent none", "-")
        return
    for rev in revs:
        say("freeze breakdown (ms): " + " ".join(f"{k}={rev.get(k, 0):.1f}" for k in ("total_ms", *PARTS)))
    for part in ("total_ms", *PARTS):
        ms = statistics.median(r.get(part, 0.0) for r in revs)
        peers = [s[part] for s in stocks if part in s]
        row(
            f"freeze: {part.removesuffix('_ms')}" + (" (median)" if len(revs) > 1 else ""),
            f"{ms:.1f} ms",
            f"{statistics.median(peers):.1f} ms" if peers else "-",
            "stock: runc's wall time, CRIU's frozen_time is the sum of its criu_ parts" if part == "total_ms" else "",
        )


FETCH_PARTS = ("fetch_ms", "open_ms", "decode_ms", "verify_ms", "write_ms")


def restore_breakdown_rows(rev: dict[str, Any] | None, stock: dict[str, float]) -> None:
    """revenant's restore part by part (the shim's `restore` in the registry record) beside the stock
    restore's: `zstd -d | tar -x` in the fetch row, `runc restore` split by CRIU's stats-restore."""
    if not rev:
        row("restore breakdown", "the shim recorded none", "-")
        return
    say("restore breakdown (ms): " + json.dumps(rev))
    for part in ("total_ms", *RESTORE_PARTS):
        peer = stock.get(part)
        peer_ms = "-" if peer is None else f"{peer:.1f} ms"
        row(f"restore: {part.removesuffix('_ms')}", f"{rev.get(part, 0.0):.1f} ms", peer_ms)
    fetch = rev.get("fetch") or {}
    if fetch:
        row(
            "restore: fetch, thread time per part",
            " / ".join(f"{k.removesuffix('_ms')} {fetch[k]:.0f}" for k in FETCH_PARTS) + " ms",
            "-",
            f"{fetch['chunks']} chunks ({fetch['zero_chunks']} holes), {mib_s(fetch['bytes_fetched'])} fetched, "
            f"{mib_s(fetch['bytes_written'])} written, {fetch['files']} files, wall {fetch['wall_ms']:.0f} ms, "
            f"overlap {fetch['overlap']}x; slowest: "
            + ", ".join(f"{f['path']} {f['ms']:.0f} ms" for f in fetch.get("slowest_files", [])[:3]),
        )


def stock_restore_breakdown(untar_s: float, runc_s: float, work: Path) -> dict[str, float]:
    """The stock restore in revenant's parts: untar as the fetch, runc restore split by stats-restore."""
    st = read_restore_stats(work)
    criu = min(st.restore_time_us / 1e6, runc_s) if st else 0.0
    forking = min(st.forking_time_us / 1e6, criu) if st else 0.0
    out = {
        "prepare_fetch_ms": untar_s * 1000,
        "runc_own_ms": (runc_s - criu) * 1000,
        "criu_forking_ms": forking * 1000,
        "criu_restore_other_ms": (criu - forking) * 1000,
    }
    out["total_ms"] = sum(out.values())
    return out


def runc_checkpoint(node: ContainerdNode, *args: str) -> None:
    """`runc checkpoint ARGS stock` of the stock shim's job."""
    argv = ["runc", "--root", str(runc_root(node)), "checkpoint", *args, "stock"]
    subprocess.run(argv, check=True, capture_output=True, timeout=1800)


# -- 1 + 2: freeze and restore ----------------------------------------------------------------------
def bench_freeze_and_restore(
    a: ContainerdNode,
    b: ContainerdNode,
    image_a: str,
    image_b: str,
    mib: int,
    work: Path,
    store: str,
    repeat: int,
    restore: bool = True,
    lazy: bool = False,
) -> None:
    # Stock: the same job under the stock runc shim, dumped by runc onto local disk.
    a.ctr("run", "-d", "--runc-root", str(a.runc_root), image_a, "stock", *memjob_cmd(mib, 5), input="")
    wait_for_step(a.rootfs("stock") / LOG_IN_CONTAINER.lstrip("/"), 3, timeout=120)
    disk = Path(tempfile.mkdtemp(prefix="rv-bench-", dir="/var/tmp"))
    try:
        # revenant: the periodic path, asked for now; the two jobs run side by side and are checkpointed
        # in alternation, so both sides meet the same load on this shared machine.
        job = Job("job", "bench/protect/main", store, mib=mib, interval="off")
        run_job(a, image_a, job, command=memjob_cmd(mib, 6))
        wait_for_step(job_log(a, job.cid), 3, timeout=120)
        peak = ShmPeak()
        peak.start()
        stock_walls: list[float] = []
        stock_stats: list[Any] = []
        results: list[dict[str, Any]] = []
        for i in range(repeat):
            img, wk = disk / f"leave-running-{i}", disk / f"leave-running-{i}.work"
            t = time.monotonic()
            runc_checkpoint(a, "--leave-running", "--image-path", str(img), "--work-path", str(wk))
            stock_walls.append(time.monotonic() - t)
            stock_stats.append(read_dump_stats(wk))
            shutil.rmtree(img, ignore_errors=True)
            shutil.rmtree(wk, ignore_errors=True)
            results.append(revenant_cli("checkpoint", job.cid, "--run-dir", str(a.revenant_run_dir), "--json"))
            say(f"pair {i + 1}/{repeat}: revenant {results[-1]['freeze_s']:.3f} s, runc {stock_walls[-1]:.3f} s wall")
        peak.halt.set()
        peak.join()
        res = results[-1]
        frozen = [r["freeze_s"] for r in results]
        stock_frozen_all = [
            st.frozen_time_us / 1e6 if st else wall for st, wall in zip(stock_stats, stock_walls, strict=True)
        ]
        rev_freeze, stock_frozen = statistics.median(frozen), statistics.median(stock_frozen_all)
        spread = f"; runs {' '.join(f'{x:.2f}' for x in frozen)} vs {' '.join(f'{x:.2f}' for x in stock_frozen_all)}"
        row(
            f"freeze, leave-running checkpoint ({mib} MiB)" + (f", median of {repeat}" if repeat > 1 else ""),
            f"{rev_freeze:.2f} s frozen",
            f"{stock_frozen:.2f} s frozen (CRIU frozen_time; runc to /var/tmp, "
            f"{statistics.median(stock_walls):.2f} s wall)",
            f"ratio {rev_freeze / stock_frozen:.2f}x; revenant committed in {res['total_s']:.2f} s"
            + (spread if repeat > 1 else ""),
        )
        stock = [stock_breakdown(w, st) for w, st in zip(stock_walls, stock_stats, strict=True)]
        freeze_breakdown_rows([r.get("freeze") or {} for r in results], stock)

        # A final runc dump of the stock job for the restore comparison; it also frees its memory.
        img2, wk2 = disk / "final", disk / "final.work"
        runc_checkpoint(a, "--image-path", str(img2), "--work-path", str(wk2))
        row(
            "peak extra memory of staging",
            f"{mib_s(peak.peak)} in /dev/shm (freed after upload)",
            "-",
            f"{mib_s(res['bytes_read'])} checkpoint; /dev/shm is shared with other processes",
        )

        if not restore:
            return
        # Restore. Final checkpoint of the revenant job, then `ctr run` on B (Create to running).
        revenant_cli("checkpoint", job.cid, "--exit", "--run-dir", str(a.revenant_run_dir), "--json")
        wait_stopped(a, job.cid)
        last_on_a = read_steps(job_log(a, job.cid))[-1].n
        t = time.monotonic()
        run_job(b, image_b, job, command=memjob_cmd(mib, 6))
        rev_restore = time.monotonic() - t
        # memjob's step reads all of its memory: its first step on B is when the memory is all there.
        wait_until(
            lambda: (read_steps(job_log(b, job.cid)) or [Step(0, "")])[-1].n > last_on_a,
            1800,
            "a step on B",
            interval=0.05,
        )
        rev_first_step = time.monotonic() - t
        record = registry_record(b, job.cid) or {}
        restored = record.get("restored_from")
        # The job goes on stepping (each step reads all of its memory: allow ~2 s per GiB and step, loaded).
        on_b = read_steps(job_log(b, job.cid))[-1].n
        try:
            wait_for_step(job_log(b, job.cid), on_b + 2, timeout=max(120.0, mib / 256))
            steps_after = "two more steps"
        except TimeoutError:  # a row that says so, not a lost run: the restore figures below are measured
            steps_after = f"no two more steps within {max(120.0, mib / 256):.0f} s (step {on_b} was the last)"
        b.ctr("task", "kill", "-s", "SIGKILL", job.cid, check=False, input="")  # its memory, before the peer's

        # Stock: `zstd -d | tar -x` of the final runc dump (archived untimed above) + `runc restore`
        # into a copy of its bundle.
        bundle = disk / "bundle"
        (bundle / "rootfs").mkdir(parents=True)
        subprocess.run(["cp", "-a", f"{a.rootfs('stock')}/.", str(bundle / "rootfs")], check=True)
        spec = json.loads((a.bundle("stock") / "config.json").read_text())
        spec["linux"]["cgroupsPath"] = f"/rv-bench-restore-{os.getpid()}"
        spec["root"]["path"] = str(bundle / "rootfs")
        (bundle / "config.json").write_text(json.dumps(spec))
        archive = disk / "final.tar.zst"
        subprocess.run(f"tar -C {img2} -cf - . | zstd -q -1 -T0 -o {archive}", shell=True, check=True)
        dest, rroot = disk / "restore", disk / "runc-root"
        dest.mkdir()
        t = time.monotonic()
        subprocess.run(f"zstd -q -d -c {archive} | tar -x -C {dest}", shell=True, check=True)
        untar = time.monotonic() - t
        # The restored job inherits runc's stdio: a file, not a pipe we would wait on forever.
        with open(disk / "restore.out", "wb") as out:
            r = subprocess.run(
                [
                    "runc",
                    "--root",
                    str(rroot),
                    "restore",
                    "--detach",
                    "--image-path",
                    str(dest),
                    "--work-path",
                    str(disk / "restore.work"),
                    "--bundle",
                    str(bundle),
                    "stock-restored",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                timeout=1800,
            )
        stock_restore = time.monotonic() - t
        stock_parts = stock_restore_breakdown(untar, stock_restore - untar, disk / "restore.work")
        r.stderr = (disk / "restore.out").read_text(errors="replace")
        if r.returncode != 0:
            tail = disk / "restore.work" / "restore.log"
            detail = tail.read_text()[-400:] if tail.exists() else r.stderr[-400:]
            peer = f"runc restore failed: {detail.strip().splitlines()[-1] if detail.strip() else r.returncode}"
        else:
            peer = f"{stock_restore:.2f} s ({untar:.2f} s zstd -d \\| tar -x, archive {mib_s(archive.stat().st_size)})"
            subprocess.run(["runc", "--root", str(rroot), "kill", "stock-restored", "KILL"], capture_output=True)
            time.sleep(0.5)
            subprocess.run(["runc", "--root", str(rroot), "delete", "-f", "stock-restored"], capture_output=True)
        row(
            f"restore on B, to running ({mib} MiB)",
            f"{rev_restore:.2f} s (`ctr run`, from seq {restored})",
            peer,
            f"ratio {rev_restore / stock_restore:.2f}x" if r.returncode == 0 else "",
        )
        restore_breakdown_rows(record.get("restore"), stock_parts if r.returncode == 0 else {})
        row(
            f"restore on B, to the job's first step ({mib} MiB; the step reads all its memory)",
            f"{rev_first_step:.2f} s" + (" (lazy restore)" if lazy else ""),
            "-",
            f"{rev_first_step - rev_restore:.2f} s after `ctr run` returned; then {steps_after}",
        )
        if lazy:  # the daemon's own figure: from its start (before `runc restore`) to its last page
            arrived = re.search(r"all lazy pages arrived ([0-9.]+)s after the daemon started", shim_log(b))
            row(
                f"lazy restore: every page arrived ({mib} MiB)",
                f"{float(arrived[1]):.2f} s after the daemon started" if arrived else "not logged",
                "-",
                "the pages a step faults first, then the rest streamed by `criu lazy-pages`",
            )
        b.ctr("task", "kill", "-s", "SIGKILL", job.cid, check=False, input="")
        for node in (a, b):  # Delete drops the registry record: later sections see only their own tasks
            node.ctr("task", "rm", "-f", job.cid, check=False, input="")
            node.ctr("containers", "rm", job.cid, check=False, input="")
    finally:
        subprocess.run(["umount", "-R", str(disk / "bundle" / "rootfs")], capture_output=True)
        shutil.rmtree(disk, ignore_errors=True)


# -- 3: podman --------------------------------------------------------------------------------------
def bench_podman(images: Any, mib: int, work: Path) -> None:
    podman = shutil.which("podman")
    if podman is None:
        row("podman checkpoint / restore", "-", "not run: podman not installed (apt-get install podman)")
        return
    root = work / "podman"
    base = [
        podman,
        "--root",
        str(root / "root"),
        "--runroot",
        str(root / "run"),
        "--cgroup-manager",
        "cgroupfs",
        "--events-backend",
        "file",
    ]

    def pm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        r = subprocess.run([*base, *args], capture_output=True, text=True, timeout=1800)
        if check and r.returncode != 0:
            raise RuntimeError(f"podman {' '.join(args)}: {r.stderr.strip()[-500:]}")
        return r

    try:
        version = pm("version", "--format", "{{.Client.Version}}").stdout.strip()
        pm("load", "-i", str(images.memjob))
        ref = images.memjob_ref
        pm(
            "run",
            "-d",
            "--name",
            "pj",
            "--network",
            "none",
            "--ulimit",
            "nofile=1024:1024",
            "--ulimit",
            "nproc=4096:4096",
            ref,
            *memjob_cmd(mib, 8),
        )
        wait_until(lambda: "step=3" in pm("logs", "pj", check=False).stdout, 120, "podman job step 3")
        archive = work / "podman-ckpt.tar.zst"
        t = time.monotonic()
        pm("container", "checkpoint", "--export", str(archive), "--compress", "zstd", "--leave-running", "pj")
        ck = time.monotonic() - t
        pm("rm", "-f", "pj")
        t = time.monotonic()
        pm("container", "restore", "--import", str(archive))
        rs = time.monotonic() - t
        row(
            f"podman {version}: checkpoint --export --leave-running / restore --import",
            "(see rows above)",
            f"{ck:.2f} s export, {rs:.2f} s import (archive {mib_s(archive.stat().st_size)})",
        )
    except (RuntimeError, AssertionError, subprocess.TimeoutExpired) as e:
        row("podman checkpoint / restore", "-", f"failed: {str(e)[:300]}")
    finally:
        pm("rm", "-af", "-t", "0", check=False)
        subprocess.run([*base, "system", "reset", "-f"], capture_output=True, timeout=300)
        shutil.rmtree(root, ignore_errors=True)


# -- 4: notice to committed into S3 -----------------------------------------------------------------
def bench_notice_s3(node: ContainerdNode, image: str, mib: int, work: Path) -> None:
    from tests.harness.servers import S3_ACCESS_KEY, S3_BUCKET, S3_SECRET_KEY, SeaweedS3

    os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"] = S3_ACCESS_KEY, S3_SECRET_KEY
    srv = SeaweedS3(work / "seaweed")
    metadata = MetadataServer(("aws",)).start()
    agent = None
    try:
        srv.start()
        # The shim inherits containerd's environment: restart the node so it has the credentials.
        node.env.update({"AWS_ACCESS_KEY_ID": S3_ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": S3_SECRET_KEY})
        node.restart()
        store = f"s3://{S3_BUCKET}/bench-{os.getpid()}?endpoint={srv.endpoint}"
        job = Job("s3job", "bench/notice/main", store, mib=mib, interval="off")
        run_job(node, image, job, command=memjob_cmd(mib, 9))
        wait_for_step(job_log(node, job.cid), 3, timeout=120)
        agent = AgentProcess(node.revenant_run_dir, metadata.url, work / "agent.log")
        agent.start()
        t = time.monotonic()
        metadata.aws_terminate(120)
        agent.wait_drain(timeout=1800)
        total = time.monotonic() - t
        (res,) = [r for r in agent.results() if r["id"] == job.cid]
        if res["status"] != "ok":
            row(f"notice -> committed, S3 ({mib} MiB)", f"failed: {res['error']}", "-")
        else:
            row(
                f"notice -> committed, S3 ({mib} MiB)",
                f"{total:.1f} s",
                "target <= 30 s for 4 GiB",
                f"frozen {res['freeze_s']:.2f} s, {mib_s(res['bytes_uploaded'])} uploaded; agent polls every 0.5 s",
            )
    finally:
        if agent is not None:
            agent.stop()
        metadata.stop()
        srv.shutdown()


# -- 5: interrupted vs uninterrupted ----------------------------------------------------------------
def run_to_completion(
    nodes: list[ContainerdNode], images: dict[str, str], mib: int, steps: int, interruptions: int, store: str, tag: str
) -> tuple[float, list[Any], float]:
    """Run `steps` steps; with interruptions, move the job between nodes that many times, evenly spaced.
    Returns (wall seconds, the steps in the final log, seconds spent in moves)."""
    job = Job(f"run{tag}", f"bench/run-{tag}/main", store, mib=mib, interval="off")
    cmd = memjob_cmd(mib, 12, interval_ms=100, steps=steps)
    node = nodes[0]
    t0 = time.monotonic()
    run_job(node, images[node.name], job, command=cmd)
    moves = 0.0
    for k in range(1, interruptions + 1):
        wait_for_step(job_log(node, job.cid), steps * k // (interruptions + 1), timeout=1800)
        m = time.monotonic()
        revenant_cli("checkpoint", job.cid, "--exit", "--run-dir", str(node.revenant_run_dir), "--json")
        wait_stopped(node, job.cid)
        node.ctr("task", "rm", "-f", job.cid, check=False, input="")
        node.ctr("containers", "rm", job.cid, check=False, input="")
        node = nodes[k % len(nodes)]
        run_job(node, images[node.name], job, command=cmd)
        moves += time.monotonic() - m
    wait_until(lambda: task_status(node, job.cid) == "STOPPED", 1800, f"{job.cid} to finish")
    wall = time.monotonic() - t0
    final = read_steps(job_log(node, job.cid))
    node.ctr("task", "rm", "-f", job.cid, check=False, input="")
    node.ctr("containers", "rm", job.cid, check=False, input="")
    return wall, final, moves


def bench_interruptions(
    a: ContainerdNode, b: ContainerdNode, images: dict[str, str], mib: int, steps: int, interruptions: int, store: str
) -> None:
    plain, _, _ = run_to_completion([a], images, mib, steps, 0, store, "plain")
    wall, final, moves = run_to_completion([a, b], images, mib, steps, interruptions, store, "moved")
    assert_continuous(final)
    lost = steps - len({s.n for s in final})
    row(
        f"{steps} steps, {interruptions} interruptions vs none ({mib} MiB)",
        f"{wall:.1f} s wall, {lost} steps lost",
        f"{plain:.1f} s uninterrupted",
        f"overhead {100 * (wall - plain) / plain:.1f} % ({moves:.1f} s in {interruptions} moves: final "
        "checkpoint + `ctr run` restore; no reschedule gap)",
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mib", type=int, default=128, help="job memory in MiB (default 128)")
    ap.add_argument("--gib", type=float, default=None, help="job memory in GiB (overrides --mib)")
    ap.add_argument("--steps", type=int, default=300, help="steps of the interrupted/uninterrupted run")
    ap.add_argument("--interruptions", type=int, default=4)
    ap.add_argument(
        "--staging-dir", default=None, help="node A's staging_dir (default: the node default, /dev/shm/revenant)"
    )
    ap.add_argument(
        "--freeze-repeat", type=int, default=1, help="alternating checkpoint pairs (runc, revenant); medians reported"
    )
    ap.add_argument(
        "--skip", action="append", default=[], choices=("freeze", "restore", "memory", "podman", "s3", "run")
    )
    ap.add_argument("--stream-budget-mib", type=int, default=512, help="the streamed side's budget (memory section)")
    ap.add_argument(
        "--lazy-restore", action="store_true", help="node B restores lazily (node config lazy_restore = true)"
    )
    ap.add_argument(
        "--store",
        choices=("file", "s3"),
        default="file",
        help="where the freeze/restore job checkpoints: file:// on local disk (default) or SeaweedFS S3 on 127.0.0.1",
    )
    args = ap.parse_args()
    mib = int(args.gib * 1024) if args.gib else args.mib
    work = Path(tempfile.mkdtemp(prefix="rv-pbench-", dir="/var/tmp"))
    store = f"file://{work / 'store'}"
    seaweed = None
    say(f"building images; job memory {mib} MiB; work dir {work}")
    images = build_test_images(work / "images")
    a, b = ContainerdNode("a"), ContainerdNode("b")
    if args.staging_dir:
        a.write_revenant_config(extra=f'staging_dir = "{args.staging_dir}"')
    try:
        if args.store == "s3":
            from tests.harness.servers import S3_ACCESS_KEY, S3_BUCKET, S3_SECRET_KEY, SeaweedS3

            creds = {"AWS_ACCESS_KEY_ID": S3_ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": S3_SECRET_KEY}
            os.environ.update(creds)
            for node in (a, b):  # the shims inherit containerd's environment
                node.env.update(creds)
            # The server's capacity is volume_max x 64 MB: room for several checkpoints of the job.
            seaweed = SeaweedS3(work / "seaweed-store", volume_max=max(50, mib // 8))
            seaweed.start()
            store = f"s3://{S3_BUCKET}/bench-store-{os.getpid()}?endpoint={seaweed.endpoint}"
        if args.lazy_restore:
            b.write_revenant_config(extra="lazy_restore = true")
        a.start()
        b.start()
        refs = {"a": a.import_image(images.memjob), "b": b.import_image(images.memjob)}
        if "freeze" not in args.skip:
            restore = "restore" not in args.skip
            bench_freeze_and_restore(
                a, b, refs["a"], refs["b"], mib, work, store, args.freeze_repeat, restore, args.lazy_restore
            )
        if "memory" not in args.skip:
            bench_checkpoint_memory(a, refs["a"], mib, store, args.freeze_repeat, args.stream_budget_mib)
        if "podman" not in args.skip:
            bench_podman(images, mib, work)
        if "run" not in args.skip:
            bench_interruptions(a, b, refs, mib, args.steps, args.interruptions, store)
        if "s3" not in args.skip:
            bench_notice_s3(a, refs["a"], mib, work)
    finally:
        a.destroy()
        b.destroy()
        if seaweed is not None:
            seaweed.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    print(f"\nCommand: .venv/bin/python bench/protect_bench.py {shlex.join(sys.argv[1:])}\n")
    print("| measure | revenant | peer | note |\n|---|---|---|---|")
    for r in ROWS:
        print("| " + " | ".join(r) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
