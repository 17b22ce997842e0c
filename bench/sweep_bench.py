"""Data-path sweep: freeze, commit and restore against job size, beside stock runc and Podman, in one run.

For each size (`--sizes`, GiB) on two private containerd nodes (revenant's shim; runc 1.1.5, CRIU 4.1.1):
- revenant: a memjob under protection (file:// store on local disk); `revenant checkpoint` (leave
  running: frozen window, first checkpoint committed locally), then a final checkpoint and `ctr run` of
  the same key on node B (restore to running); then a second job with an s3:// store (SeaweedFS on
  127.0.0.1, packs): AWS spot notice from the local metadata server -> a real `revenant agent` -> final
  checkpoint committed (its first checkpoint, committed into S3).
- stock runc: the same memjob under containerd's runc shim; `runc checkpoint --leave-running` into
  /var/tmp (CRIU frozen time, wall time), a final dump archived with tar | zstd (untimed), then
  `zstd -d | tar -x` + `runc restore --detach` (timed).
- Podman 4.3.1: `container checkpoint --export --compress zstd --leave-running` / `restore --import`.
Then `--checkpoints` leave-running checkpoints of one job (bytes uploaded each, `--incremental-gib`)
and the interrupted run: `--run-steps` steps with 0..`--max-interruptions` moves between the nodes, the
runs side by side (overhead against the uninterrupted one, seconds per move, steps lost).

Results go to a JSON file (`--json`) and, from it, Markdown tables on stdout and PNG plots in `--out-dir`
(bench/sweep_report.py); `--plot-only FILE...` redraws them from saved JSON without running anything.
Sizes above 1 GiB take /tmp/revenant-heavy.lock (the machine's heavy-run lock; if a parent process such
as `flock` already holds it, that is used). Run as root:

    .venv/bin/python bench/sweep_bench.py                                  # make bench: 0.125 + 0.25 GiB
    .venv/bin/python bench/sweep_bench.py --sizes 0.25,0.5,1,2,4 --run-steps 5000 --out-dir bench
    .venv/bin/python bench/sweep_bench.py --plot-only bench/sweep.json --out-dir bench
"""

from __future__ import annotations

import argparse
import datetime
import fcntl
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from bench import sweep_report  # noqa: E402

HEAVY_LOCK = Path("/tmp/revenant-heavy.lock")
HEAVY_GIB = 1.0


def say(msg: str) -> None:
    print(f"# {time.strftime('%H:%M:%S')} {msg}", file=sys.stderr, flush=True)


def load_average() -> float:
    return os.getloadavg()[0]


# -- the heavy-run lock --------------------------------------------------------------------------
def _ancestors() -> set[int]:
    pids, pid = set(), os.getpid()
    while pid > 1:
        pids.add(pid)
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            break
        pid = int(stat.rsplit(")", 1)[1].split()[1])  # field 4, after the command name in parentheses
    return pids


def _lock_holders(path: Path) -> set[int]:
    """PIDs holding a lock on `path`'s inode, from /proc/locks."""
    ino = path.stat().st_ino
    holders = set()
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 6 and fields[5].rsplit(":", 1)[-1] == str(ino) and fields[4].isdigit():
            holders.add(int(fields[4]))
    return holders


@contextmanager
def heavy_lock(needed: bool) -> Iterator[None]:
    """Hold the machine's heavy-run lock for the run, unless an ancestor (`flock ... sweep_bench`) holds it."""
    if not needed:
        yield
        return
    fd = os.open(HEAVY_LOCK, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if _lock_holders(HEAVY_LOCK) & _ancestors():
                say(f"{HEAVY_LOCK} is held by a parent process: running under it")
                yield
                return
            say(f"waiting for {HEAVY_LOCK} (another heavy run holds it)")
            fcntl.flock(fd, fcntl.LOCK_EX)
        say(f"holding {HEAVY_LOCK}")
        yield
    finally:
        os.close(fd)


# -- measuring -----------------------------------------------------------------------------------
def memjob(mib: int, seed: int, *, mutate: float = 0.05, interval_ms: int = 1000, steps: int = 0) -> list[str]:
    from harness.memjob import LOG_IN_CONTAINER

    cmd = ["/bin/memjob", "--mib", str(mib), "--mutate", str(mutate), "--seed", str(seed)]
    cmd += ["--interval-ms", str(interval_ms), "--log", LOG_IN_CONTAINER]
    return cmd + (["--steps", str(steps)] if steps else [])


def _both_jobs_fit(mib: int) -> bool:
    """Whether revenant's job and the stock one can run side by side: two jobs' memory within 85 % of
    what the machine has available now (the rest for CRIU, containerd and the page cache)."""
    with open("/proc/meminfo") as f:
        available_kib = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
    return 2 * mib * 1024 <= 0.85 * available_kib


def _start_wait_s(mib: int) -> float:
    return 120 + mib / 8  # allocating and filling the job's memory on a loaded 2-core VM


class Sweep:
    def __init__(self, work: Path, args: argparse.Namespace) -> None:
        from harness.containerd import ContainerdNode
        from harness.images import build_test_images
        from tests.harness.servers import S3_ACCESS_KEY, S3_SECRET_KEY

        self.work, self.args = work, args
        self.store = f"file://{work / 'store'}"  # the upload series' and the interrupted run's
        self.images = build_test_images(work / "images")
        self.a, self.b = ContainerdNode("a"), ContainerdNode("b")
        if "s3" not in args.skip:
            # The shim inherits containerd's environment: the nodes start with the S3 credentials.
            os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"] = S3_ACCESS_KEY, S3_SECRET_KEY
            for node in (self.a, self.b):
                node.env.update({"AWS_ACCESS_KEY_ID": S3_ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": S3_SECRET_KEY})
        self.refs: dict[str, str] = {}

    def start(self) -> None:
        self.a.start()
        self.b.start()
        self.refs = {"a": self.a.import_image(self.images.memjob), "b": self.b.import_image(self.images.memjob)}

    def stop(self) -> None:
        self.a.destroy()
        self.b.destroy()

    def _remove(self, node: Any, cid: str) -> None:
        node.ctr("task", "kill", "-s", "SIGKILL", cid, check=False, input="")
        node.ctr("task", "rm", "-f", cid, check=False, input="")
        node.ctr("containers", "rm", cid, check=False, input="")

    # -- one size --------------------------------------------------------------------------------
    def size(self, gib: float) -> dict[str, Any]:
        mib = round(gib * 1024)
        entry: dict[str, Any] = {"gib": gib, "mib": mib, "load_before": load_average()}
        entry["revenant"], entry["runc"] = {}, {}
        if "local" not in self.args.skip:
            if "stock" in self.args.skip or _both_jobs_fit(mib):
                entry["revenant"], entry["runc"] = self._revenant_and_runc(mib)
            else:  # one job at a time, in this run: same code, same machine, minutes apart
                say(f"{mib} MiB: two jobs need more memory than the machine has: revenant's side, then runc's")
                entry["one_job_at_a_time"] = True
                entry["revenant"] = self._revenant_and_runc(mib, with_stock=False)[0]
                entry["runc"] = self._revenant_and_runc(mib, with_revenant=False)[1]
        if "s3" not in self.args.skip:
            entry["revenant"].update(self._notice_s3(mib))
            if self.args.stream_budget_mib:  # the same path with the streaming dump, same run
                self.a.write_revenant_config(extra=f"stream_budget_mib = {self.args.stream_budget_mib}")
                try:
                    streamed = self._notice_s3(mib, tag="-stream")  # the job's shim reads the config at Create
                finally:
                    self.a.write_revenant_config()
                entry["revenant"].update({f"{k}_stream": v for k, v in streamed.items()})
        if "podman" not in self.args.skip:
            entry["podman"] = self._podman(mib)
        entry["load_after"] = load_average()
        say(f"{gib:g} GiB: {json.dumps(entry)}")
        return entry

    def _revenant_and_runc(
        self, mib: int, with_revenant: bool = True, with_stock: bool | None = None
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        from bench.protect_bench import revenant_cli, runc_root
        from harness.memjob import LOG_IN_CONTAINER, read_steps, wait_for_step
        from harness.protect import Job, job_log, registry_record, run_job, wait_stopped
        from shim.checkpoint.criu_stats import read_dump_stats

        a, b = self.a, self.b
        rev: dict[str, Any] = {}
        stock: dict[str, Any] = {}
        disk = Path(tempfile.mkdtemp(prefix="rv-sweep-", dir="/var/tmp"))
        # A store per size, removed after it: the disk holds one size's checkpoints at a time.
        store_dir = self.work / f"store-{mib}"
        job = Job(f"j{mib}", f"bench/sweep-{mib}/main", f"file://{store_dir}", mib=mib, interval="off")
        stock_id = f"stock{mib}"

        def runc_checkpoint(*args: str) -> None:
            argv = ["runc", "--root", str(runc_root(a)), "checkpoint", *args, stock_id]
            subprocess.run(argv, check=True, capture_output=True, timeout=1800)

        if with_stock is None:
            with_stock = "stock" not in self.args.skip
        try:
            if with_stock:
                a.ctr("run", "-d", "--runc-root", str(a.runc_root), self.refs["a"], stock_id, *memjob(mib, 5), input="")
            if with_revenant:
                run_job(a, self.refs["a"], job, command=memjob(mib, 6))
            if with_stock:
                wait_for_step(a.rootfs(stock_id) / LOG_IN_CONTAINER.lstrip("/"), 2, timeout=_start_wait_s(mib))
            if with_revenant:
                wait_for_step(job_log(a, job.cid), 2, timeout=_start_wait_s(mib))

            if with_stock:
                img, wk = disk / "leave-running", disk / "leave-running.work"
                t = time.monotonic()
                runc_checkpoint("--leave-running", "--image-path", str(img), "--work-path", str(wk))
                stock["checkpoint_s"] = time.monotonic() - t
                st = read_dump_stats(wk)
                stock["frozen_s"] = st.frozen_time_us / 1e6 if st else stock["checkpoint_s"]
                shutil.rmtree(img, ignore_errors=True)
                shutil.rmtree(wk, ignore_errors=True)

            if with_revenant:
                res = revenant_cli("checkpoint", job.cid, "--run-dir", str(a.revenant_run_dir), "--json")
                rev.update(
                    freeze_s=res["freeze_s"],
                    commit_local_s=res["total_s"],
                    bytes_read=res["bytes_read"],
                    bytes_uploaded_local=res["bytes_uploaded"],
                    freeze_parts=res.get("freeze"),  # where the frozen milliseconds went (shim.protect.freeze)
                )
            runc_frozen = f"{stock['frozen_s']:.2f} s" if with_stock else "not run"
            rev_frozen = f"{rev['freeze_s']:.2f} s" if with_revenant else "not run"
            say(f"{mib} MiB: runc frozen {runc_frozen}, revenant frozen {rev_frozen}")
            if "restore" in self.args.skip:
                return rev, stock

            if with_stock:  # the stock job's final dump (frees its memory), archived untimed for the restore
                final, finalwk = disk / "final", disk / "final.work"
                runc_checkpoint("--image-path", str(final), "--work-path", str(finalwk))
                archive = disk / "final.tar.zst"
                subprocess.run(f"tar -C {final} -cf - . | zstd -q -1 -T0 -o {archive}", shell=True, check=True)
                shutil.rmtree(final, ignore_errors=True)
                stock["archive_bytes"] = archive.stat().st_size

            if with_revenant:
                revenant_cli("checkpoint", job.cid, "--exit", "--run-dir", str(a.revenant_run_dir), "--json")
                wait_stopped(a, job.cid, timeout=600)
                self._remove(a, job.cid)
                t = time.monotonic()
                run_job(b, self.refs["b"], job, command=memjob(mib, 6))
                rev["restore_s"] = time.monotonic() - t
                rev["restored_from"] = (registry_record(b, job.cid) or {}).get("restored_from")
                log = job_log(b, job.cid)
                wait_for_step(log, read_steps(log)[-1].n + 1, timeout=_start_wait_s(mib))
                self._remove(b, job.cid)  # its memory, before the peer's restore

            if with_stock:
                stock.update(self._runc_restore(disk, archive, stock_id))
        finally:
            self._remove(a, job.cid)
            self._remove(b, job.cid)
            a.ctr("task", "kill", "-s", "SIGKILL", stock_id, check=False, input="")
            a.ctr("task", "rm", "-f", stock_id, check=False, input="")
            a.ctr("containers", "rm", stock_id, check=False, input="")
            subprocess.run(["umount", "-R", str(disk / "bundle" / "rootfs")], capture_output=True)
            shutil.rmtree(disk, ignore_errors=True)
            shutil.rmtree(store_dir, ignore_errors=True)
        return rev, stock

    def _runc_restore(self, disk: Path, archive: Path, stock_id: str) -> dict[str, Any]:
        """`zstd -d | tar -x` of the archived dump + `runc restore --detach` into a copy of the bundle."""
        a = self.a
        bundle = disk / "bundle"
        (bundle / "rootfs").mkdir(parents=True)
        subprocess.run(["cp", "-a", f"{a.rootfs(stock_id)}/.", str(bundle / "rootfs")], check=True)
        spec = json.loads((a.bundle(stock_id) / "config.json").read_text())
        spec["linux"]["cgroupsPath"] = f"/rv-sweep-restore-{os.getpid()}"
        spec["root"]["path"] = str(bundle / "rootfs")
        (bundle / "config.json").write_text(json.dumps(spec))
        dest, rroot = disk / "restore", disk / "runc-root"
        dest.mkdir()
        name = f"stock-restored-{os.getpid()}"
        t = time.monotonic()
        subprocess.run(f"zstd -q -d -c {archive} | tar -x -C {dest}", shell=True, check=True)
        untar = time.monotonic() - t
        argv = ["runc", "--root", str(rroot), "restore", "--detach", "--image-path", str(dest)]
        argv += ["--work-path", str(disk / "restore.work"), "--bundle", str(bundle), name]
        with open(disk / "restore.out", "wb") as out:  # the restored job inherits runc's stdio: a file
            r = subprocess.run(
                argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                timeout=1800,
            )
        total = time.monotonic() - t
        subprocess.run(["runc", "--root", str(rroot), "kill", name, "KILL"], capture_output=True)
        time.sleep(0.5)
        subprocess.run(["runc", "--root", str(rroot), "delete", "-f", name], capture_output=True)
        if r.returncode != 0:
            return {"restore_error": (disk / "restore.out").read_text(errors="replace")[-300:]}
        return {"restore_s": total, "untar_s": untar}

    def _notice_s3(self, mib: int, tag: str = "") -> dict[str, Any]:
        from harness.memjob import wait_for_step
        from harness.metadata_server import MetadataServer
        from harness.protect import AgentProcess, Job, job_log, run_job
        from tests.harness.servers import S3_BUCKET, SeaweedS3

        # A fresh SeaweedFS per size, its data removed after: the disk holds one size's objects at a time.
        s3 = SeaweedS3(self.work / f"seaweed-{mib}", volume_max=max(50, mib * 2 // 64))  # 64 MB volumes
        store = f"s3://{S3_BUCKET}/sweep-{os.getpid()}?endpoint={s3.endpoint}"
        job = Job(f"s3j{mib}", f"bench/sweep-s3-{mib}/main", store, mib=mib, interval="off")
        metadata = MetadataServer(("aws",)).start()
        agent = AgentProcess(self.a.revenant_run_dir, metadata.url, self.work / f"agent-{mib}{tag}.log")
        try:
            s3.start()
            run_job(self.a, self.refs["a"], job, command=memjob(mib, 9))
            wait_for_step(job_log(self.a, job.cid), 2, timeout=_start_wait_s(mib))
            agent.start()
            t = time.monotonic()
            metadata.aws_terminate(self.args.notice_s)
            agent.wait_drain(timeout=1800)
            total = time.monotonic() - t
            (res,) = [r for r in agent.results() if r["id"] == job.cid]
            if res["status"] != "ok":
                return {"notice_s3_error": str(res.get("error"))[:300]}
            return {
                "notice_s3_s": total,
                "notice_s": self.args.notice_s,
                "s3_shim_total_s": res.get("total_s"),
                "s3_freeze_s": res.get("freeze_s"),
                "bytes_uploaded_s3": res.get("bytes_uploaded"),
                "s3_freeze_parts": res.get("freeze"),
            }
        finally:
            agent.stop()
            metadata.stop()
            self._remove(self.a, job.cid)
            s3.shutdown()
            shutil.rmtree(self.work / f"seaweed-{mib}", ignore_errors=True)

    def _podman(self, mib: int) -> dict[str, Any]:
        from harness.wait import wait_until

        podman = shutil.which("podman")
        if podman is None:
            return {"error": "podman not installed"}
        root = self.work / "podman"
        base = [podman, "--root", str(root / "root"), "--runroot", str(root / "run")]
        base += ["--cgroup-manager", "cgroupfs", "--events-backend", "file"]

        def pm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
            r = subprocess.run([*base, *args], capture_output=True, text=True, timeout=1800)
            if check and r.returncode != 0:
                raise RuntimeError(f"podman {' '.join(args)}: {r.stderr.strip()[-300:]}")
            return r

        name = f"pj{mib}"
        try:
            version = pm("version", "--format", "{{.Client.Version}}").stdout.strip()
            pm("load", "-i", str(self.images.memjob))
            pm(
                "run", "-d", "--name", name, "--network", "none", "--ulimit", "nofile=1024:1024",
                "--ulimit", "nproc=4096:4096", self.images.memjob_ref, *memjob(mib, 8),
            )  # fmt: skip
            wait_until(lambda: "step=2" in pm("logs", name, check=False).stdout, _start_wait_s(mib), "podman step 2")
            archive = self.work / "podman-ckpt.tar.zst"
            t = time.monotonic()
            pm("container", "checkpoint", "--export", str(archive), "--compress", "zstd", "--leave-running", name)
            export = time.monotonic() - t
            pm("rm", "-f", "-t", "0", name)
            t = time.monotonic()
            pm("container", "restore", "--import", str(archive))
            imported = time.monotonic() - t
            size = archive.stat().st_size
            archive.unlink()
            return {"version": version, "export_s": export, "import_s": imported, "archive_bytes": size}
        except (RuntimeError, AssertionError, subprocess.TimeoutExpired) as e:
            return {"error": str(e)[:300]}
        finally:
            pm("rm", "-af", "-t", "0", check=False)
            subprocess.run([*base, "system", "reset", "-f"], capture_output=True, timeout=300)
            shutil.rmtree(root, ignore_errors=True)

    # -- bytes uploaded over a job's checkpoints -------------------------------------------------
    def incremental(self, gib: float, count: int, steps_between: int, mutate: float) -> dict[str, Any]:
        from bench.protect_bench import revenant_cli
        from harness.memjob import read_steps, wait_for_step
        from harness.protect import Job, job_log, run_job

        mib = round(gib * 1024)
        job = Job(f"inc{mib}", f"bench/sweep-inc-{mib}/main", self.store, mib=mib, interval="off")
        out: dict[str, Any] = {"gib": gib, "steps_between": steps_between, "mutate": mutate, "checkpoints": []}
        try:
            run_job(self.a, self.refs["a"], job, command=memjob(mib, 21, mutate=mutate, interval_ms=200))
            log = job_log(self.a, job.cid)
            wait_for_step(log, 2, timeout=_start_wait_s(mib))
            for i in range(count):
                if i:
                    wait_for_step(log, read_steps(log)[-1].n + steps_between, timeout=_start_wait_s(mib))
                res = revenant_cli("checkpoint", job.cid, "--run-dir", str(self.a.revenant_run_dir), "--json")
                cp = {k: res[k] for k in ("seq", "bytes_read", "bytes_uploaded", "freeze_s", "total_s")}
                cp["step"] = read_steps(log)[-1].n
                out["checkpoints"].append(cp)
                say(f"incremental {i + 1}/{count}: {json.dumps(cp)}")
        finally:
            self._remove(self.a, job.cid)
        return out

    # -- the interrupted run ---------------------------------------------------------------------
    def interruptions(self, mib: int, steps: int, ks: list[int], interval_ms: int) -> dict[str, Any]:
        """Runs with k moves for each k in `ks`, side by side (one thread each, same load for all)."""
        from harness.memjob import assert_continuous

        results: dict[int, dict[str, Any]] = {}

        def one(k: int) -> None:
            try:
                nodes = [self.a] if k == 0 else [self.a, self.b]
                wall, final, moves = self.run_to_completion(nodes, mib, steps, interval_ms, k, f"k{k}")
                assert_continuous(final)
                if not final or final[-1].n != steps:  # stopped early: killed, not finished
                    raise RuntimeError(f"the job stopped at step {final[-1].n if final else 0} of {steps}")
                results[k] = {"k": k, "wall_s": wall, "moves_s": moves, "lost": steps - len({s.n for s in final})}
            except Exception as e:  # reported in the JSON: the other runs' figures still count
                results[k] = {"k": k, "error": f"{type(e).__name__}: {str(e)[:300]}"}
            say(f"interrupted run k={k}: {results[k]}")

        # Daemon threads: an interrupted sweep tears its nodes down without waiting for the runs.
        threads = [threading.Thread(target=one, args=(k,), daemon=True) for k in ks]
        for t in threads:
            t.start()
        for t in threads:
            while t.is_alive():  # in slices: a signal reaches the main thread meanwhile
                t.join(1)
        runs = [results[k] for k in sorted(results) if "wall_s" in results[k]]
        errors = [results[k] for k in sorted(results) if "error" in results[k]]
        return {
            "mib": mib,
            "steps": steps,
            "interval_ms": interval_ms,
            "runs": runs,
            "errors": errors,
            "side_by_side": True,
        }

    def run_to_completion(
        self, nodes: list[Any], mib: int, steps: int, interval_ms: int, k: int, tag: str
    ) -> tuple[float, list[Any], float]:
        """`steps` steps moved k times between the nodes, evenly spaced (final checkpoint, `ctr run` on the
        next node). Returns (wall seconds, the final log's steps, seconds from each checkpoint's start to
        the restored task's start, summed)."""
        from bench.protect_bench import revenant_cli
        from harness.memjob import read_steps, wait_for_step
        from harness.protect import Job, job_log, run_job, task_status, wait_stopped
        from harness.wait import wait_until

        job = Job(f"run{tag}", f"bench/sweep-run-{tag}-{os.getpid()}/main", self.store, mib=mib, interval="off")
        cmd = memjob(mib, 12, interval_ms=interval_ms, steps=steps)
        node = nodes[0]
        limit = steps * (interval_ms / 1000 + 1) + 600
        t0 = time.monotonic()
        run_job(node, self.refs[node.name], job, command=cmd)
        moves = 0.0
        for i in range(1, k + 1):
            wait_for_step(job_log(node, job.cid), steps * i // (k + 1), timeout=limit)
            m = time.monotonic()
            revenant_cli("checkpoint", job.cid, "--exit", "--run-dir", str(node.revenant_run_dir), "--json")
            wait_stopped(node, job.cid, timeout=600)
            self._remove(node, job.cid)
            node = nodes[i % len(nodes)]
            run_job(node, self.refs[node.name], job, command=cmd)
            moves += time.monotonic() - m
        wait_until(lambda: task_status(node, job.cid) == "STOPPED", limit, f"{job.cid} to finish")
        wall = time.monotonic() - t0
        final = read_steps(job_log(node, job.cid))
        self._remove(node, job.cid)
        return wall, final, moves


def _sizes(text: str) -> list[float]:
    out: list[float] = []
    for part in filter(None, text.split(",")):  # "" = no sizes (only the other sections)
        v = float(part)
        if not 0 < v <= 64:
            raise argparse.ArgumentTypeError(f"size {part} GiB: expected 0 < size <= 64")
        out.append(v)
    return out


def _counts(text: str) -> list[int]:
    out = sorted({int(part) for part in text.split(",") if part})
    if not out or out[0] < 0 or out[-1] > 64:
        raise argparse.ArgumentTypeError(f"move counts {text!r}: expected 0..64, comma-separated")
    return out


def write_outputs(data: dict[str, Any], out_dir: Path) -> None:
    print(sweep_report.tables(data))
    written = sweep_report.plot(data, out_dir)
    if written:
        print("\nplots: " + " ".join(str(p) for p in written))
    else:
        print("\nplots skipped: matplotlib is not installed (pip install '.[bench]')")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=_sizes, default=[0.125, 0.25], help="GiB, comma-separated (default 0.125,0.25)")
    ap.add_argument(
        "--skip",
        action="append",
        default=[],
        choices=("local", "stock", "restore", "s3", "podman", "incremental", "run"),
        help="local = the file:// store and runc side (freeze, local commit, restore); stock = the runc side only "
        "(its job runs beside revenant's: twice the memory; where two do not fit, after revenant's, in the same "
        "run); restore = just the restores",
    )
    ap.add_argument(
        "--stream-budget-mib",
        type=int,
        default=0,
        help="also run the S3 notice path with this stream_budget_mib (streaming dump), after the staged one",
    )
    ap.add_argument(
        "--notice-s",
        type=float,
        default=120,
        help="the spot notice's lead time (AWS gives 120 s; the agent's deadline is that, minus its slack)",
    )
    ap.add_argument("--checkpoints", type=int, default=10, help="checkpoints of one job for the upload series")
    ap.add_argument("--incremental-gib", type=float, default=0.25)
    ap.add_argument("--steps-between", type=int, default=5, help="memjob steps between those checkpoints")
    ap.add_argument("--mutate", type=float, default=0.005, help="fraction of pages each step rewrites (upload series)")
    ap.add_argument("--run-mib", type=int, default=128, help="memory of the interrupted run's memjob")
    ap.add_argument("--run-steps", type=int, default=300, help="steps of the interrupted run")
    ap.add_argument("--run-interval-ms", type=int, default=100, help="the interrupted run's pause per step")
    ap.add_argument("--max-interruptions", type=int, default=4)
    ap.add_argument(
        "--run-ks",
        type=_counts,
        default=None,
        help="only these move counts side by side, e.g. 0,4 (default 0..--max-interruptions); fewer runs, less load",
    )
    ap.add_argument("--json", type=Path, default=None, help="results file (default OUT_DIR/sweep.json)")
    ap.add_argument("--out-dir", type=Path, default=None, help="plots and JSON (default: a temporary directory)")
    ap.add_argument("--plot-only", type=Path, nargs="+", metavar="FILE", help="redraw from saved JSON, run nothing")
    args = ap.parse_args(argv)
    out_dir = args.out_dir or Path(tempfile.mkdtemp(prefix="rv-sweep-out-"))
    if args.plot_only:
        merged = sweep_report.load(args.plot_only)
        if args.json:  # the parts of a sweep run in pieces, as one record
            args.json.write_text(json.dumps(merged, indent=1) + "\n")
        write_outputs(merged, out_dir)
        return 0
    if os.geteuid() != 0:
        ap.error("the sweep drives containerd, runc and CRIU: run it as root (--plot-only does not need root)")
    json_path = args.json or out_dir / "sweep.json"
    data: dict[str, Any] = {
        "meta": {
            "command": ".venv/bin/python bench/sweep_bench.py "
            + shlex.join(argv if argv is not None else sys.argv[1:]),
            "started": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
            "load": [load_average()],
            "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "cpus": os.cpu_count(),
        }
    }
    heavy = max([*args.sizes, 0 if "incremental" in args.skip else args.incremental_gib]) > HEAVY_GIB
    work = Path(tempfile.mkdtemp(prefix="rv-sweep-", dir="/var/tmp"))

    def save() -> None:
        data["meta"]["finished"] = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(data, indent=1) + "\n")

    def interrupted(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")  # unwinds through the teardown below

    # Also when started in the background, where a shell leaves SIGINT ignored.
    signal.signal(signal.SIGINT, interrupted)
    signal.signal(signal.SIGTERM, interrupted)
    with heavy_lock(heavy):
        sweep = Sweep(work, args)
        try:
            sweep.start()
            steps: list[tuple[str, Callable[[], None]]] = []
            if args.sizes:
                data["sizes"] = []
            for gib in args.sizes:
                steps.append((f"{gib:g} GiB", lambda gib=gib: data["sizes"].append(sweep.size(gib))))
            if "incremental" not in args.skip:
                steps.append(
                    (
                        "incremental",
                        lambda: data.__setitem__(
                            "incremental",
                            sweep.incremental(args.incremental_gib, args.checkpoints, args.steps_between, args.mutate),
                        ),
                    )
                )
            if "run" not in args.skip:
                steps.append(
                    (
                        "interrupted run",
                        lambda: data.__setitem__(
                            "interruptions",
                            sweep.interruptions(
                                args.run_mib,
                                args.run_steps,
                                args.run_ks if args.run_ks is not None else list(range(args.max_interruptions + 1)),
                                args.run_interval_ms,
                            ),
                        ),
                    )
                )
            for name, step in steps:
                say(f"{name} (load {load_average():.1f})")
                step()
                data["meta"]["load"].append(load_average())
                save()  # partial results survive a later failure
        finally:
            sweep.stop()
            shutil.rmtree(work, ignore_errors=True)
    save()
    print(f"\nCommand: {data['meta']['command']}\nresults: {json_path}\n")
    write_outputs(data, out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
