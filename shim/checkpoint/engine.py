"""The checkpoint engine: runc + CRIU dumps and restores of one container, with statistics.

The ttrpc Task service, the periodic checkpointer, the spot-notice agent and the CLI all go through
this one class, so ordering rules live in one place: checkpoints of one container are serialized,
hooks (GPU lock/checkpoint) run around the dump and are always undone on error, and a failure names
CRIU's own error lines while the full log is kept beside the bundle.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from shim.runc.driver import IOFds, Runc, RuncError

from .criu_log import error_lines
from .criu_stats import DumpStats, RestoreStats, read_dump_stats, read_restore_stats
from .lazy_daemon import LazyPagesError
from .lazy_restore import LazyRestore, LazySession
from .options import CheckpointOptions, RestoreOptions

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """runc/CRIU could not checkpoint or restore; the message carries CRIU's error lines."""

    def __init__(self, message: str, log_path: Path | None = None) -> None:
        super().__init__(message)
        self.log_path = log_path


class DumpHooks(Protocol):
    """Work around the dump that CRIU cannot do itself (the CUDA checkpoint API, for one)."""

    def before_dump(self, container_id: str) -> None: ...
    def after_dump(self, container_id: str, *, leave_running: bool, failed: bool) -> None: ...
    def after_restore(self, container_id: str) -> None: ...


@dataclass
class CheckpointResult:
    image_dir: Path
    duration_s: float
    stats: DumpStats | None
    image_bytes: int
    timings: dict[str, float] = field(default_factory=dict)
    finished_at: float = field(default_factory=time.time)  # wall clock, for "the last checkpoint"

    def as_dict(self) -> dict[str, object]:
        return {
            "finished_at": round(self.finished_at, 3),
            "image_dir": str(self.image_dir),
            "duration_s": round(self.duration_s, 6),
            "image_bytes": self.image_bytes,
            "criu": self.stats.as_dict() if self.stats else None,
            "timings": {k: round(v, 6) for k, v in self.timings.items()},
        }


@dataclass
class RestoreResult:
    pid: int
    duration_s: float
    stats: RestoreStats | None
    runc_s: float | None = None  # `runc restore` alone (duration_s adds the hooks after it)


def directory_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


class CheckpointEngine:
    """Checkpoints and restores through a `shim.runc.driver.Runc` (the caller's root, log and runner: inside
    the shim that runner is the subreaper's, so runc's exit status is never stolen)."""

    def __init__(self, hooks: DumpHooks | None = None) -> None:
        self.hooks = hooks
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        # The newest checkpoint of each container, whoever asked for it (ctr, periodic, agent, CLI).
        self.last_results: dict[str, CheckpointResult] = {}
        # Each container's restore, until the protection layer took it for its breakdown (take_restore).
        self._last_restores: dict[str, RestoreResult] = {}
        # Lazy restores whose pages are still arriving: a dump of the container waits for the end.
        self._lazy: dict[str, LazySession] = {}

    def _lock(self, container_id: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(container_id, threading.Lock())

    def checkpoint(
        self,
        runc: Runc,
        container_id: str,
        image_dir: Path,
        options: CheckpointOptions,
        keep_log_in: Path | None = None,
        wrap: Callable[[list[str]], list[str]] | None = None,
    ) -> CheckpointResult:
        """Dump the container into `image_dir`; serialized per container. wrap: the command line that runs
        `runc checkpoint`'s instead (e.g. inside a memory cgroup, shim.runc.memcg)."""
        self.wait_lazy(container_id)
        with self._lock(container_id):
            return self._checkpoint(runc, container_id, image_dir, options, keep_log_in, wrap)

    def _checkpoint(
        self,
        runc: Runc,
        container_id: str,
        image_dir: Path,
        options: CheckpointOptions,
        keep_log_in: Path | None,
        wrap: Callable[[list[str]], list[str]] | None = None,
    ) -> CheckpointResult:
        image_dir.mkdir(parents=True, exist_ok=True)
        work = options.work_path or image_dir.parent / f".{image_dir.name}.work"
        work.mkdir(parents=True, exist_ok=True)
        args = ["--image-path", str(image_dir), "--work-path", str(work), *options.criu_flags()]
        if not options.exit:
            args.append("--leave-running")
        for ns in options.empty_namespaces:
            args += ["--empty-ns", ns]
        timings: dict[str, float] = {}
        start = time.monotonic()
        if self.hooks:
            self.hooks.before_dump(container_id)
            timings["hooks_before_s"] = time.monotonic() - start
        dump_start = time.monotonic()
        error: RuncError | None = None
        try:
            if wrap is None:
                runc.checkpoint(container_id, args)
            else:
                runc.checkpoint(container_id, args, wrap=wrap)
        except RuncError as e:
            error = e
        finally:
            timings["runc_checkpoint_s"] = time.monotonic() - dump_start
            if self.hooks:
                t = time.monotonic()
                self.hooks.after_dump(container_id, leave_running=not options.exit, failed=error is not None)
                timings["hooks_after_s"] = time.monotonic() - t
        if error is not None:
            kept = self._keep_log(work / "dump.log", keep_log_in, "criu-dump.log")
            raise CheckpointError(self._failure("checkpoint", container_id, error, work / "dump.log", kept), kept)
        stats = read_dump_stats(work)
        if options.work_path is None:
            shutil.rmtree(work, ignore_errors=True)
        result = CheckpointResult(image_dir, time.monotonic() - start, stats, directory_bytes(image_dir), timings)
        self.last_results[container_id] = result
        if stats is None:
            log.info(
                "checkpointed %s in %.3fs (%d image bytes; CRIU wrote no statistics)",
                container_id,
                result.duration_s,
                result.image_bytes,
            )
        else:
            log.info(
                "checkpointed %s in %.3fs: freezing %d us, frozen %d us, memdump %d us, memwrite %d us, "
                "pages scanned %d, written %d, image bytes %d",
                container_id,
                result.duration_s,
                stats.freezing_time_us,
                stats.frozen_time_us,
                stats.memdump_time_us,
                stats.memwrite_time_us,
                stats.pages_scanned,
                stats.pages_written,
                result.image_bytes,
            )
        return result

    def wait_lazy(self, container_id: str) -> None:
        """Until a lazy restore of the container has all its pages (or failed): only then is its memory
        all there to dump."""
        session = self._lazy.get(container_id)
        if session is not None and not session.done.is_set():
            log.info("%s: waiting for the lazy restore's last pages before the dump", container_id)
            session.done.wait()

    def forget(self, container_id: str) -> None:
        """Drop what the engine keeps about a deleted container (a shared shim lives on)."""
        self.last_results.pop(container_id, None)
        self._lazy.pop(container_id, None)
        self._last_restores.pop(container_id, None)
        with self._locks_guard:
            lock = self._locks.get(container_id)
            if lock is not None and not lock.locked():
                del self._locks[container_id]

    def last_stats(self, container_id: str) -> dict[str, object] | None:
        """The newest checkpoint's statistics of a container as a JSON-able dict, or None."""
        result = self.last_results.get(container_id)
        return None if result is None else {"container_id": container_id, **result.as_dict()}

    def restore(
        self,
        runc: Runc,
        container_id: str,
        bundle: Path,
        image_dir: Path,
        options: RestoreOptions,
        pid_file: Path,
        io: IOFds,
        work_path: Path | None = None,
        console_socket: str | None = None,
        keep_log_in: Path | None = None,
        lazy: LazyRestore | None = None,
    ) -> RestoreResult:
        """`runc restore --detach` of `image_dir` as `container_id`; the restored process inherits
        `io` in place of the streams it had at dump time (runc maps them from descriptors.json). With
        `lazy`, image_dir's pages files lack the lazy ranges: `criu lazy-pages` fed from lazy.source
        delivers them while the job runs (shim.checkpoint.lazy_restore)."""
        work = work_path or bundle / "criu-work"
        work.mkdir(parents=True, exist_ok=True)
        args = [
            "--detach",
            "--image-path",
            str(image_dir),
            "--work-path",
            str(work),
            "--pid-file",
            str(pid_file),
            "--no-subreaper",
            "--bundle",
            str(bundle),
            *options.checkpoint.criu_flags(),
        ]
        if options.no_pivot:
            args.append("--no-pivot")
        if console_socket:
            args += ["--console-socket", console_socket]
        start = time.monotonic()
        with self._lock(container_id):
            session = None
            if lazy is not None:
                session = LazySession(runc, container_id, lazy)
                try:
                    session.start(image_dir, work)
                except (LazyPagesError, OSError, ValueError) as e:
                    session.abort(str(e))
                    raise CheckpointError(f"restore of {container_id} failed: lazy pages: {e}") from e
                args.append("--lazy-pages")
            try:
                runc.restore(container_id, args, io)
            except RuncError as e:
                kept = self._keep_log(work / "restore.log", keep_log_in, "criu-restore.log")
                message = self._failure("restore", container_id, e, work / "restore.log", kept)
                if session is not None:
                    session.abort(message)
                raise CheckpointError(message, kept) from e
            if session is not None:
                self._lazy[container_id] = session
                try:
                    session.restored()
                except LazyPagesError as e:
                    # runc has the (killed) container in its state: remove it, as runc does after a failed
                    # restore, or the fallback to an older checkpoint (or a fresh start) finds the id taken.
                    self._lazy.pop(container_id, None)
                    try:
                        runc.delete(container_id, force=True)
                    except RuncError as d:
                        log.warning("%s: delete after lazy pages failed during the restore: %s", container_id, d)
                    raise CheckpointError(f"restore of {container_id} failed: {e}") from e
        runc_s = time.monotonic() - start
        if self.hooks:
            self.hooks.after_restore(container_id)
        pid = int(pid_file.read_text().strip())
        result = RestoreResult(pid, time.monotonic() - start, read_restore_stats(work), runc_s)
        self._last_restores[container_id] = result
        return result

    def take_restore(self, container_id: str) -> RestoreResult | None:
        """The container's last restore (once): its timings for the restore breakdown."""
        return self._last_restores.pop(container_id, None)

    @staticmethod
    def _keep_log(log_file: Path, keep_in: Path | None, name: str) -> Path | None:
        if keep_in is None or not log_file.exists():
            return log_file if log_file.exists() else None
        keep_in.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(log_file, keep_in / name)
        return keep_in / name

    @staticmethod
    def _failure(what: str, container_id: str, error: RuncError, log_file: Path, kept: Path | None) -> str:
        criu = error_lines(log_file)
        detail = "; ".join(criu) if criu else str(error)
        where = f" (full CRIU log: {kept})" if kept else ""
        return f"{what} of {container_id} failed: {detail}{where}"
