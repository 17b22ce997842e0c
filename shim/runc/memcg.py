"""A memory cgroup for one `runc checkpoint` (and the CRIU it starts): the dump's page cache bounded.

A streamed dump writes its page images into on-disk scratch faster than the disk and the store drain
them; the dirty page cache that piles up is charged to the writer, CRIU. Run in a child memory cgroup
of the budget's size, CRIU is throttled by the kernel's reclaim at the limit (it waits for the
writeback of its own dirty pages; what the put consumed is punched out and uncharged) instead of
filling the node's memory. Only runc is moved in, by a tiny wrapper that joins the cgroup and execs
it, so CRIU (runc's child) is born there; nothing else ever is. CRIU dumps the cgroups of the tasks
it dumps, not its own: a dump from another cgroup than the container's is the normal case (CRIU runs
in the shim's).

The limit must never kill CRIU: killed mid-dump, it leaves the job's processes seized with its
parasite inside them. Only page cache is meant to be held back; should CRIU's own memory reach the
limit, the limit is lifted instead. cgroup v1 (`memory.limit_in_bytes`, `memory.max_usage_in_bytes`,
`memory.oom_control`) where the memory controller is mounted there: its OOM killer is turned off for
the cgroup (a task at the limit waits instead) and a watcher lifts the limit as soon as the cgroup
reports `under_oom 1`. Else cgroup v2 where the shim's cgroup may delegate the controller: only
`memory.high` (reclaim and throttling, never an OOM kill), `memory.peak`, `memory.events`. Where none
can be made (no memory controller, no permission) the dump runs without it; that is logged once.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import threading
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

ROOT = Path("/sys/fs/cgroup")
# Joins the cgroup named by $0 (its cgroup.procs), then becomes runc: every process runc starts is
# born inside. If the join fails, runc runs where the shim runs (reported by peak == 0).
JOIN = 'echo $$ > "$0" 2>/dev/null; exec "$@"'
OOM_POLL_S = 0.05  # how often the v1 watcher looks for a task waiting at the limit

_warned = threading.Event()


@dataclass
class DumpCgroupReport:
    limit_bytes: int
    peak_bytes: int
    oom_kills: int
    version: int
    lifted: bool = False  # the limit was lifted: CRIU's own memory reached it (v1)

    def as_dict(self) -> dict[str, int]:
        return {
            "limit_bytes": self.limit_bytes,
            "peak_bytes": self.peak_bytes,
            "oom_kills": self.oom_kills,
            "cgroup_version": self.version,
            "limit_lifted": int(self.lifted),
        }


class DumpCgroup:
    """One dump's memory cgroup: `wrap(argv)` runs argv inside; `close()` reads its peak and removes it."""

    def __init__(self, path: Path, v2: bool, limit_bytes: int) -> None:
        self.path, self.v2, self.limit_bytes = path, v2, limit_bytes
        self.report: DumpCgroupReport | None = None
        self.lifted = False
        self._closing = threading.Event()
        self._watcher: threading.Thread | None = None

    @classmethod
    def create(cls, limit_bytes: int, root: Path = ROOT) -> DumpCgroup | None:
        """A child of this process's memory cgroup limited to limit_bytes, or None where none can be made.
        Its name is random (nothing from outside goes into the path)."""
        try:
            parent, v2 = own_memory_cgroup(root)
            if v2:
                _delegate_memory(parent)
            path = parent / f"revenant-dump-{secrets.token_hex(8)}"
            path.mkdir()
        except OSError as e:
            _warn_once(f"cannot make a memory cgroup for dumps, CRIU's page cache is not bounded: {e}")
            return None
        cg = cls(path, v2, limit_bytes)
        try:
            if v2:
                # memory.high reclaims and throttles; no memory.max: its OOM kill would end CRIU mid-dump.
                cg._write("memory.high", str(limit_bytes))
            else:
                cg._write("memory.limit_in_bytes", str(limit_bytes))
                cg._write("memory.oom_control", "1")  # at the limit a task waits (the watcher lifts it)
        except OSError as e:
            cg._remove()
            _warn_once(f"cannot limit a dump's memory cgroup {path}, CRIU's page cache is not bounded: {e}")
            return None
        if not v2:
            cg._watcher = threading.Thread(target=cg._lift_when_stuck, name="dump-memcg-watch", daemon=True)
            cg._watcher.start()
        return cg

    def _lift_when_stuck(self) -> None:
        """v1: a task waiting at the limit means memory that reclaim cannot free (CRIU's own, not page
        cache): lift the limit so the dump goes on, and say so."""
        while not self._closing.wait(OOM_POLL_S):
            try:
                stuck = "under_oom 1" in (self.path / "memory.oom_control").read_text()
                if stuck:
                    self._write("memory.limit_in_bytes", "-1")
            except OSError:
                return  # removed
            if stuck:
                self.lifted = True
                log.warning(
                    "the dump's memory cgroup %s reached its limit (%d bytes) with memory reclaim cannot free: "
                    "limit lifted, this dump's page cache is not bounded",
                    self.path,
                    self.limit_bytes,
                )
                return

    def wrap(self, argv: list[str]) -> list[str]:
        return ["/bin/sh", "-c", JOIN, str(self.path / "cgroup.procs"), *argv]

    def close(self) -> DumpCgroupReport:
        """Read the peak and the OOM kills, remove the cgroup (runc and CRIU have exited)."""
        if self.report is None:
            self._closing.set()
            if self._watcher is not None:
                self._watcher.join()
            self.report = DumpCgroupReport(
                self.limit_bytes, self._peak(), self._oom_kills(), 2 if self.v2 else 1, self.lifted
            )
            self._remove()
        return self.report

    def _write(self, name: str, value: str) -> None:
        (self.path / name).write_text(value)

    def _peak(self) -> int:
        with contextlib.suppress(OSError, ValueError):
            return read_peak(self.path, self.v2)
        return 0

    def _oom_kills(self) -> int:
        with contextlib.suppress(OSError, ValueError):
            return read_oom_kills(self.path, self.v2)
        return 0

    def _remove(self) -> None:
        try:
            os.rmdir(self.path)
        except OSError as e:  # a process still inside: the next dump's cgroup has another name
            log.warning("cannot remove the dump's memory cgroup %s: %s", self.path, e)


def read_peak(path: Path, v2: bool) -> int:
    """The memory cgroup's highest charge since creation: memory, tmpfs and page cache of all inside."""
    return int((path / ("memory.peak" if v2 else "memory.max_usage_in_bytes")).read_text())


def read_oom_kills(path: Path, v2: bool) -> int:
    """How many processes the kernel's OOM killer ended in the memory cgroup."""
    for line in (path / ("memory.events" if v2 else "memory.oom_control")).read_text().splitlines():
        k, _, v = line.partition(" ")
        if k == "oom_kill":
            return int(v)
    return 0


def own_memory_cgroup(root: Path) -> tuple[Path, bool]:
    """(this process's memory cgroup directory, whether it is cgroup v2); OSError where there is none."""
    v1 = v2 = None
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        hid, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            v1 = path
        elif hid == "0":
            v2 = path
    if v1 is not None and (root / "memory" / "memory.limit_in_bytes").exists():
        return root / "memory" / v1.lstrip("/"), False
    if v2 is not None and (root / "cgroup.controllers").exists():
        if "memory" not in (root / "cgroup.controllers").read_text().split():
            raise OSError("the cgroup v2 hierarchy has no memory controller")
        return root / v2.lstrip("/"), True
    raise OSError("no memory cgroup mounted")


def _delegate_memory(parent: Path) -> None:
    """cgroup v2: the memory controller must be on in the parent's subtree_control for a child to have
    it (refused, EBUSY, where the parent holds processes: then there is no dump cgroup)."""
    control = parent / "cgroup.subtree_control"
    if "memory" not in control.read_text().split():
        control.write_text("+memory")


def _warn_once(message: str) -> None:
    if not _warned.is_set():
        _warned.set()
        log.warning(message)
    else:
        log.debug(message)
