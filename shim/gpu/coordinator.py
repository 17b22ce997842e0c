"""Drives every CUDA process of a container through the checkpoint API around a CRIU dump or restore.

See the package docstring (shim/gpu/__init__.py) for the contract the checkpoint engine relies on.
The rule everything here serves: once a process was locked, every path out of this module returns it to
RUNNING, or reports loudly, per pid, the state it was left in and which call failed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from .discovery import ProcRef, device_prefixes, find_cuda_processes, rss_bytes, start_time
from .driver import CUDA_ERROR_ILLEGAL_STATE, CudaDriver, CudaError, GpuError, GpuUnavailable, ProcessState
from .info import Compatibility, check_compatible, gpu_memory_by_pid, node_gpu_info

log = logging.getLogger(__name__)

DEFAULT_LOCK_TIMEOUT_MS = 10_000
DEFAULT_CALL_TIMEOUT_S = 600.0  # checkpoint/restore of tens of GiB take seconds; a call this slow is stuck
LOCK_GRACE_S = 30.0  # the driver enforces the lock timeout itself; our watchdog fires only if it does not

T = TypeVar("T")


@dataclass
class StepFailure:
    """One failed step: which process, which call, what the driver said, and the state it was left in."""

    pid: int
    step: str  # lock | checkpoint | restore | unlock | get_state | dump | discover
    error: str
    code: int | None = None
    state_after: str | None = None

    def __str__(self) -> str:
        left = f"; left {self.state_after}" if self.state_after else ""
        return f"pid {self.pid}: {self.step}: {self.error}{left}"


class GpuStepError(GpuError):
    """A GPU step failed. `failures` lists each failed call; `rollback` each failed return to RUNNING."""

    def __init__(self, message: str, failures: list[StepFailure], rollback: list[StepFailure] | None = None):
        self.failures = failures
        self.rollback = rollback or []
        lines = [message, *(f"  {f}" for f in failures)]
        if self.rollback:
            lines += ["  returning to RUNNING also failed:", *(f"    {f}" for f in self.rollback)]
        super().__init__("\n".join(lines))

    @property
    def job_left_running(self) -> bool:
        return not self.rollback


class GpuQuiesceError(GpuStepError):
    """Lock or checkpoint failed before the dump; the dump must not run. job_left_running says if rollback held."""


class GpuRollbackError(GpuStepError):
    """A process could not be returned to RUNNING after a failure: the job may be stuck locked/checkpointed."""


class GpuResumeError(GpuStepError):
    """Restore or unlock failed after a dump (leave-running) or after runc restore."""


class GpuIncompatible(GpuError):
    """This node's GPUs differ from the checkpoint's (model or count) or it has no GPU support."""


class _Stuck(Exception):
    """A driver call outlived its watchdog; `done` is set when it finally returns."""

    def __init__(self, call: str, pid: int, seconds: float, done: threading.Event):
        self.done = done
        super().__init__(f"{call} did not return within {seconds:.1f} s (driver call stuck)")


def _call_with_deadline(call: str, pid: int, fn: Callable[[], T], deadline_s: float) -> T:
    """Run a blocking driver call in a thread (ctypes drops the GIL) and stop waiting after deadline_s."""
    box: dict[str, Any] = {}
    done = threading.Event()

    def target() -> None:
        try:
            box["result"] = fn()
        except BaseException as e:
            box["error"] = e
        finally:
            done.set()

    threading.Thread(target=target, name=f"gpu-{call}-{pid}", daemon=True).start()
    if not done.wait(deadline_s):
        raise _Stuck(call, pid, deadline_s, done)
    if "error" in box:
        raise box["error"]
    return box["result"]


def _failure(pid: int, step: str, err: BaseException) -> StepFailure:
    return StepFailure(pid, step, str(err), err.code if isinstance(err, CudaError) else None)


class GpuCoordinator:
    """Owns the (lazily loaded) driver and the timeouts; hands out GpuSessions."""

    def __init__(
        self,
        driver: CudaDriver | None = None,
        *,
        libcuda: str | None = None,
        device_prefixes: tuple[str, ...] | None = None,
        lock_timeout_ms: int = DEFAULT_LOCK_TIMEOUT_MS,
        call_timeout_s: float = DEFAULT_CALL_TIMEOUT_S,
        lock_grace_s: float = LOCK_GRACE_S,
        retries: int = 1,
        retry_delay_s: float = 0.5,
        state_timeout_s: float = 10.0,
    ):
        self._driver = driver
        self._libcuda = libcuda
        self._unavailable: str | None = None
        self._load_lock = threading.Lock()
        self.device_prefixes = device_prefixes
        self.lock_timeout_ms = lock_timeout_ms
        self.call_timeout_s = call_timeout_s
        self.lock_grace_s = lock_grace_s
        self.retries = retries  # extra attempts of a failed restore/unlock on the way back to RUNNING
        self.retry_delay_s = retry_delay_s
        self.state_timeout_s = state_timeout_s  # GetState of a pid that may not be a CUDA process at all
        self._reapers: list[threading.Thread] = []

    # -- driver ----------------------------------------------------------------------------------------------
    def driver(self) -> CudaDriver:
        """The loaded driver; GpuUnavailable (with the reason) when this node has no GPU support."""
        with self._load_lock:
            if self._driver is None and self._unavailable is None:
                try:
                    self._driver = CudaDriver.load(self._libcuda)
                except GpuUnavailable as e:
                    self._unavailable = str(e)
                    log.info("%s", e)
            if self._driver is None:
                raise GpuUnavailable(self._unavailable or "no GPU support")
            return self._driver

    def available(self) -> tuple[bool, str | None]:
        try:
            self.driver()
            return True, None
        except GpuUnavailable as e:
            return False, str(e)

    def node_info(self) -> dict[str, Any]:
        """GPU model/count/driver of this node, for metadata and check_compatible()."""
        ok, reason = self.available()
        return node_gpu_info(self._driver if ok else None, reason)

    def cuda_processes(self, pids: Iterable[int]) -> list[ProcRef]:
        return find_cuda_processes(pids, self.device_prefixes or device_prefixes())

    # -- checkpoint ------------------------------------------------------------------------------------------
    def begin(self, pids: Iterable[int], *, lock_timeout_ms: int | None = None) -> GpuSession:
        """Lock + checkpoint every CUDA process of pids and return the session; the caller dumps, then
        calls session.after_dump(leave_running) on success or session.abort(cause) on failure.

        Raises GpuQuiesceError when lock/checkpoint fails (every process returned to RUNNING first,
        unless err.rollback says otherwise): the dump must not run then.
        """
        session = GpuSession(
            self, self.cuda_processes(pids), self.lock_timeout_ms if lock_timeout_ms is None else lock_timeout_ms
        )
        session._quiesce()
        return session

    @contextmanager
    def quiesced(self, pids: Iterable[int], *, lock_timeout_ms: int | None = None) -> Iterator[GpuSession]:
        """begin() as a context manager: the body dumps and calls session.after_dump(...).

        If the body raises, every process is returned to RUNNING and the body's exception propagates
        (GpuRollbackError instead if that return failed). Leaving without after_dump() resumes every
        process still alive.
        """
        session = self.begin(pids, lock_timeout_ms=lock_timeout_ms)
        try:
            yield session
        except BaseException as e:
            session.abort(e)
            raise
        else:
            if not session.finished:
                log.warning("GPU session closed without after_dump(); resuming the processes still alive")
                session.after_dump(leave_running=None)

    def require_compatible(self, saved: dict[str, Any] | None) -> Compatibility:
        """check_compatible() against this node; GpuIncompatible (with the reason) when it fails."""
        verdict = check_compatible(saved, self.node_info())
        if not verdict:
            raise GpuIncompatible(f"refusing to restore here: {verdict.reason}")
        return verdict

    # -- restore ---------------------------------------------------------------------------------------------
    def resume_restored(self, pids: Iterable[int], *, expected: int | None = None) -> dict[str, Any]:
        """After `runc restore`/`criu restore`: restore + unlock every process the driver reports CHECKPOINTED
        or LOCKED. `expected` = the checkpoint's cuda_processes; a different count raises GpuResumeError.

        A restored process has released its GPU files, so it is found through the driver, not /dev/nvidia*.
        With no CUDA state expected and no driver this is a no-op: CPU containers restore as before.
        """
        procs = [ProcRef(p, st) for p in sorted(set(pids)) if (st := start_time(p)) is not None]
        if not expected:
            ok, reason = self.available()
            if not ok:
                return {"cuda_processes": 0, "pids": [], "skipped": reason}
        drv = self.driver()  # GpuUnavailable: GPU state expected but no driver here
        candidates: list[ProcRef] = []
        for p in procs:
            try:
                st = _call_with_deadline(
                    "cuCheckpointProcessGetState", p.pid, lambda p=p: drv.get_state(p.pid), self.state_timeout_s
                )
            except (CudaError, _Stuck) as e:
                log.debug("pid %d is not a CUDA process (%s)", p.pid, e)
                continue
            if st in (ProcessState.CHECKPOINTED, ProcessState.LOCKED):
                candidates.append(p)
        t0 = time.monotonic()
        stats: dict[str, Any] = {"restore_s": 0.0, "unlock_s": 0.0, "per_process": {}}
        failures = _drive_to_running(self, drv, candidates, stats)
        report = {
            "cuda_processes": len(candidates),
            "pids": [p.pid for p in candidates],
            "resume_s": round(time.monotonic() - t0, 6),
            **stats_as_json(stats),
        }
        if failures:
            raise GpuResumeError("GPU restore after CRIU restore failed; the restored job cannot run on:", failures)
        if expected is not None and len(candidates) != expected:
            raise GpuResumeError(
                f"the checkpoint held {expected} CUDA process(es) but the restored container has "
                f"{len(candidates)} waiting for GPU restore ({[p.pid for p in candidates]})",
                [],
            )
        log.info("GPU resumed %d restored process(es) in %.3f s", len(candidates), report["resume_s"])
        return report

    # -- stuck calls -----------------------------------------------------------------------------------------
    def _reap_later(self, proc: ProcRef, stuck: _Stuck) -> None:
        """When a stuck call finally returns, drive its process back to RUNNING (it may have just locked)."""

        def reap() -> None:
            stuck.done.wait()
            if not proc.alive():
                return
            failures = _drive_to_running(self, self.driver(), [proc], {})
            for f in failures:
                log.error("GPU: late return of a stuck call left %s", f)
            if not failures:
                log.warning("GPU: pid %d returned to RUNNING after its stuck driver call came back", proc.pid)

        t = threading.Thread(target=reap, name=f"gpu-reap-{proc.pid}", daemon=True)
        self._reapers.append(t)
        t.start()

    def wait_for_stuck_calls(self, timeout_s: float | None = None) -> bool:
        """Wait for background returns of stuck calls (tests, shim shutdown). True when none is left."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        for t in list(self._reapers):
            t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        self._reapers = [t for t in self._reapers if t.is_alive()]
        return not self._reapers


def _state_name(drv: CudaDriver, pid: int) -> str:
    try:
        st = drv.get_state(pid)
    except CudaError as e:
        return f"unknown ({e.name})"
    return st.name if isinstance(st, ProcessState) else f"state {st}"


def _timed(stats: dict[str, Any], pid: int, key: str, fn: Callable[[], None]) -> None:
    t0 = time.monotonic()
    try:
        fn()
    finally:
        dt = time.monotonic() - t0
        stats[key] = round(stats.get(key, 0.0) + dt, 6)
        stats.setdefault("per_process", {}).setdefault(pid, {})[key] = round(dt, 6)


def _drive_to_running(
    coord: GpuCoordinator, drv: CudaDriver, procs: list[ProcRef], stats: dict[str, Any]
) -> list[StepFailure]:
    """Return every live process of procs to RUNNING: restore all CHECKPOINTED, then unlock all LOCKED
    (the order a multi-process job needs). Returns what could not be done, with the state left."""
    failures: list[StepFailure] = []
    failed_pids: set[int] = set()
    for phase, from_state, call, method in (
        ("restore", ProcessState.CHECKPOINTED, "cuCheckpointProcessRestore", drv.restore),
        ("unlock", ProcessState.LOCKED, "cuCheckpointProcessUnlock", drv.unlock),
    ):
        for p in procs:
            if p.pid in failed_pids or not p.alive():
                continue
            st: ProcessState | int | None
            try:
                st = drv.get_state(p.pid)
            except CudaError as e:
                # State unknown: make the call anyway; ILLEGAL_STATE then only means "was not in from_state".
                log.warning("GPU: cannot read the state of pid %d (%s); trying %s anyway", p.pid, e.name, phase)
                st = None
            if st is not None and st != from_state:
                continue
            for attempt in range(coord.retries + 1):
                try:
                    _timed(
                        stats,
                        p.pid,
                        f"{phase}_s",
                        lambda p=p, method=method, call=call: _call_with_deadline(
                            call, p.pid, lambda: method(p.pid), coord.call_timeout_s
                        ),
                    )
                    break
                except _Stuck as e:
                    failures.append(
                        StepFailure(
                            p.pid,
                            phase,
                            str(e),
                            None,
                            "unknown (a background thread will return it to RUNNING when the call returns)",
                        )
                    )
                    failed_pids.add(p.pid)
                    coord._reap_later(p, e)
                    break
                except CudaError as e:
                    if st is None and e.code == CUDA_ERROR_ILLEGAL_STATE:
                        break  # the blind attempt found the process in another state: nothing to do here
                    state_after = _state_name(drv, p.pid)
                    if attempt < coord.retries and state_after == from_state.name:
                        # A transient failure (the driver says the call changed nothing): try again.
                        log.warning("GPU %s of pid %d failed (%s); retrying", phase, p.pid, e.name)
                        time.sleep(coord.retry_delay_s)
                        continue
                    f = _failure(p.pid, phase, e)
                    f.state_after = state_after
                    failures.append(f)
                    failed_pids.add(p.pid)
                    break
    for p in procs:
        if p.pid in failed_pids or not p.alive():
            continue
        try:
            st = drv.get_state(p.pid)
        except CudaError as e:
            failures.append(_failure(p.pid, "get_state", e))
            continue
        if st != ProcessState.RUNNING:
            name = st.name if isinstance(st, ProcessState) else f"state {st}"
            failures.append(StepFailure(p.pid, "resume", f"process is {name}, not RUNNING", None, name))
    return failures


class GpuSession:
    """The CUDA processes of one dump, held LOCKED + CHECKPOINTED between _quiesce() and after_dump()."""

    def __init__(self, coord: GpuCoordinator, procs: list[ProcRef], lock_timeout_ms: int):
        self._coord = coord
        self.processes = procs
        self.lock_timeout_ms = lock_timeout_ms
        self.finished = False
        self.node: dict[str, Any] | None = None
        self.stats: dict[str, Any] = {
            "cuda_pids": [p.pid for p in procs],
            "lock_s": 0.0,
            "checkpoint_s": 0.0,
            "restore_s": 0.0,
            "unlock_s": 0.0,
            "gpu_bytes": 0,
            "gpu_bytes_source": None,
            "per_process": {},
        }
        self.events: list[str] = []  # human-readable notes for the checkpoint's log/events

    @property
    def active(self) -> bool:
        """True when the container has CUDA processes (a CPU-only container gives an inactive session)."""
        return bool(self.processes)

    def metadata(self) -> dict[str, Any]:
        """The dict to store in the checkpoint metadata (check_compatible() reads it back)."""
        return {
            "cuda_processes": len(self.processes),
            "pids": [p.pid for p in self.processes],
            "node": self.node,
            "stats": stats_as_json(self.stats),
            "events": list(self.events),
        }

    # -- before the dump -------------------------------------------------------------------------------------
    def _quiesce(self) -> None:
        if not self.processes:
            self.finished = True  # nothing to undo; after_dump() stays a no-op
            return
        try:
            drv = self._coord.driver()
        except GpuUnavailable as e:
            raise GpuQuiesceError(
                "the container uses NVIDIA devices but this node cannot checkpoint GPU state; a CRIU dump "
                "would lose it, so no dump is taken",
                [StepFailure(p.pid, "discover", str(e)) for p in self.processes],
            ) from e
        self.node = self._coord.node_info()
        smi = gpu_memory_by_pid()
        rss_before = {p.pid: rss_bytes(p.pid) for p in self.processes}
        coord = self._coord
        deadline = (self.lock_timeout_ms / 1000 + coord.lock_grace_s) if self.lock_timeout_ms else coord.call_timeout_s
        gone: set[int] = set()
        for step, call, method, limit in (
            ("lock", "cuCheckpointProcessLock", lambda pid: drv.lock(pid, self.lock_timeout_ms), deadline),
            ("checkpoint", "cuCheckpointProcessCheckpoint", drv.checkpoint, coord.call_timeout_s),
        ):
            for p in [p for p in self.processes if p.pid not in gone]:
                try:
                    _timed(
                        self.stats,
                        p.pid,
                        f"{step}_s",
                        lambda p=p, call=call, method=method, limit=limit: _call_with_deadline(
                            call, p.pid, lambda: method(p.pid), limit
                        ),
                    )
                except (CudaError, _Stuck) as e:
                    if isinstance(e, _Stuck):
                        coord._reap_later(p, e)
                    elif step == "lock" and not p.alive():
                        # It exited between discovery and lock: nothing of it to checkpoint.
                        self.events.append(f"CUDA process {p.pid} exited before it could be locked")
                        gone.add(p.pid)
                        continue
                    failure = _failure(p.pid, step, e)
                    rollback = _drive_to_running(coord, drv, self.processes, {})
                    self.finished = True
                    cls = GpuQuiesceError
                    msg = f"GPU {step} failed before the dump; no dump was taken; " + (
                        "every CUDA process is RUNNING again" if not rollback else "ROLLBACK FAILED"
                    )
                    log.error("%s: %s", msg, failure)
                    raise cls(msg, [failure], rollback) from e
        if gone:
            self.processes = [p for p in self.processes if p.pid not in gone]
            self.stats["cuda_pids"] = [p.pid for p in self.processes]
        self._record_bytes(smi, rss_before)
        log.info(
            "GPU quiesced %d process(es): lock %.3f s, checkpoint %.3f s, %d bytes (%s)",
            len(self.processes),
            self.stats["lock_s"],
            self.stats["checkpoint_s"],
            self.stats["gpu_bytes"],
            self.stats["gpu_bytes_source"],
        )

    def _record_bytes(self, smi: dict[int, int], rss_before: dict[int, int | None]) -> None:
        total_smi = total_rss = 0
        for p in self.processes:
            per = self.stats["per_process"].setdefault(p.pid, {})
            after = rss_bytes(p.pid)
            before = rss_before.get(p.pid)
            per["rss_before_bytes"], per["rss_after_checkpoint_bytes"] = before, after
            # Checkpoint copies device memory into host memory: the RSS growth is the GPU state CRIU will dump.
            delta = max(0, (after or 0) - (before or 0))
            per["rss_growth_bytes"] = delta
            total_rss += delta
            if p.pid in smi:
                per["gpu_bytes_nvidia_smi"] = smi[p.pid]
                total_smi += smi[p.pid]
        if smi:
            self.stats["gpu_bytes"], self.stats["gpu_bytes_source"] = total_smi, "nvidia-smi"
        else:
            self.stats["gpu_bytes"], self.stats["gpu_bytes_source"] = total_rss, "rss-growth"
        self.stats["rss_growth_bytes"] = total_rss

    # -- after the dump --------------------------------------------------------------------------------------
    def after_dump(self, leave_running: bool | None) -> None:
        """Call once the dump succeeded. leave_running=True: restore + unlock every process (the job goes on).
        False: the dump killed the processes; any survivor is restored + unlocked anyway and noted.
        None: decide per process by whether it is alive. Raises GpuResumeError if a live process could not
        be returned to RUNNING (the checkpoint itself is good)."""
        if self.finished:
            return
        self.finished = True
        alive = [p for p in self.processes if p.alive()]
        dead = [p for p in self.processes if p not in alive]
        if leave_running is True and dead:
            self.events.append(f"CUDA process(es) {[p.pid for p in dead]} exited during a leave-running dump")
        if leave_running is False and alive:
            self.events.append(
                f"CUDA process(es) {[p.pid for p in alive]} survived a dump that should have "
                "stopped them; restored and unlocked them"
            )
        if not alive:
            return
        failures = _drive_to_running(self._coord, self._coord.driver(), alive, self.stats)
        if failures:
            raise GpuResumeError("GPU restore/unlock after the dump failed (the checkpoint is complete):", failures)
        log.info(
            "GPU resumed %d process(es) after the dump: restore %.3f s, unlock %.3f s",
            len(alive),
            self.stats["restore_s"],
            self.stats["unlock_s"],
        )

    def abort(self, cause: BaseException) -> None:
        """The dump failed: return every process to RUNNING. Raises GpuRollbackError if that fails."""
        if self.finished:
            return
        self.finished = True
        failures = _drive_to_running(
            self._coord, self._coord.driver(), [p for p in self.processes if p.alive()], self.stats
        )
        if failures:
            raise GpuRollbackError(
                f"the dump failed ({cause!r}) and returning the GPU processes to RUNNING failed:",
                [StepFailure(0, "dump", repr(cause))],
                failures,
            ) from cause
        cause.add_note(f"GPU: all {len(self.processes)} CUDA process(es) were restored and unlocked; the job runs on")


def stats_as_json(stats: dict[str, Any]) -> dict[str, Any]:
    """per_process keys are pids (ints); JSON wants strings."""
    out = dict(stats)
    out["per_process"] = {str(k): v for k, v in stats.get("per_process", {}).items()}
    return out


__all__ = [
    "GpuCoordinator",
    "GpuIncompatible",
    "GpuQuiesceError",
    "GpuResumeError",
    "GpuRollbackError",
    "GpuSession",
    "GpuStepError",
    "StepFailure",
    "stats_as_json",
]
