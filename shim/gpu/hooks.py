"""The checkpoint engine's DumpHooks (shim.checkpoint.engine.DumpHooks) for containers that may use CUDA.

    hooks = GpuDumpHooks(runc.ps)               # inside the shim: the container's shim.runc.driver.Runc
    engine = CheckpointEngine(hooks=hooks)
    engine.checkpoint(runc, cid, ...)            # before_dump: lock + checkpoint; after_dump: resume/abort
    metadata["gpu"] = hooks.take_metadata(cid)   # None for a CPU-only container

    hooks.expect_restore(cid, metadata["gpu"])   # BEFORE engine.restore: refuses other GPUs (GpuIncompatible)
    engine.restore(runc, cid, ...)               # after_restore: restore + unlock the restored processes

Errors propagate out of the engine's calls: GpuQuiesceError from before_dump (no dump ran),
GpuRollbackError / GpuResumeError from after_dump, GpuResumeError / GpuUnavailable from after_restore.
"""

from __future__ import annotations

import json
import logging
import subprocess
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from .coordinator import GpuCoordinator, GpuSession
from .driver import GpuError

log = logging.getLogger(__name__)


def runc_pids(runc: str = "runc", root: Path | None = None) -> Callable[[str], list[int]]:
    """pids_of for GpuDumpHooks outside the shim (tests, tools): `runc ps --format json <id>`.

    Inside the shim use the container's Runc.ps, which runs through the subreaper."""

    def pids_of(container_id: str) -> list[int]:
        cmd = [runc, *(["--root", str(root)] if root else []), "ps", "--format", "json", container_id]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
        if res.returncode != 0:
            raise GpuError(f"cannot list the processes of {container_id}: {' '.join(cmd)}: {res.stderr.strip()}")
        return [int(p) for p in json.loads(res.stdout or "[]") or []]

    return pids_of


class GpuDumpHooks:
    """Keeps one GpuSession per container between before_dump and after_dump."""

    def __init__(
        self,
        pids_of: Callable[[str], Iterable[int]],
        coordinator: GpuCoordinator | None = None,
        *,
        lock_timeout_ms: int | None = None,
    ):
        self._pids_of = pids_of
        self.coordinator = coordinator or GpuCoordinator()
        self.lock_timeout_ms = lock_timeout_ms
        self._sessions: dict[str, GpuSession] = {}
        self._metadata: dict[str, dict[str, Any]] = {}
        self._expected: dict[str, int] = {}
        self.restore_reports: dict[str, dict[str, Any]] = {}
        self._guard = threading.Lock()

    def before_dump(self, container_id: str) -> None:
        session = self.coordinator.begin(self._pids_of(container_id), lock_timeout_ms=self.lock_timeout_ms)
        with self._guard:
            self._sessions[container_id] = session

    def after_dump(self, container_id: str, *, leave_running: bool, failed: bool) -> None:
        with self._guard:
            session = self._sessions.pop(container_id, None)
        if session is None:
            return
        if failed:
            session.abort(RuntimeError(f"runc checkpoint of {container_id} failed"))
            return
        try:
            session.after_dump(leave_running=leave_running)
        finally:
            with self._guard:
                self._metadata[container_id] = session.metadata()

    def take_metadata(self, container_id: str) -> dict[str, Any] | None:
        """The GPU part of the last successful dump's metadata; None when the container had no CUDA process."""
        with self._guard:
            meta = self._metadata.pop(container_id, None)
        return meta if meta and meta.get("cuda_processes") else None

    def expect_restore(self, container_id: str, gpu_metadata: dict[str, Any] | None) -> None:
        """Check the node against the checkpoint's GPU metadata (GpuIncompatible) and remember how many
        CUDA processes after_restore must find."""
        self.coordinator.require_compatible(gpu_metadata)
        with self._guard:
            self._expected[container_id] = int((gpu_metadata or {}).get("cuda_processes") or 0)

    def after_restore(self, container_id: str) -> None:
        with self._guard:
            expected = self._expected.pop(container_id, None)
        report = self.coordinator.resume_restored(self._pids_of(container_id), expected=expected)
        with self._guard:
            self.restore_reports[container_id] = report
