"""A memory cgroup (v1 or v2) below the test process's own, to run part of a node under a memory limit.

Processes moved in (containerd) and everything they start afterwards (the shim, runc, CRIU) are
charged there: anonymous memory, tmpfs pages and page cache alike, so a dump staged in tmpfs counts
while clean page cache is reclaimed under the limit."""

from __future__ import annotations

import contextlib
import os
import time

from shim.runc.memcg import ROOT, own_memory_cgroup, read_oom_kills, read_peak


class MemoryCgroup:
    def __init__(self, name: str, limit_bytes: int) -> None:
        parent, self.v2 = own_memory_cgroup(ROOT)
        self.path = parent / name
        self.path.mkdir()
        self._write("memory.max" if self.v2 else "memory.limit_in_bytes", str(limit_bytes))
        self.limit = limit_bytes

    def _write(self, name: str, value: str) -> None:
        (self.path / name).write_text(value)

    def add(self, pid: int) -> None:
        self._write("cgroup.procs", str(pid))

    def peak(self) -> int:
        """Highest charge since creation: memory, tmpfs and page cache of everything inside."""
        return read_peak(self.path, self.v2)

    def oom_kills(self) -> int:
        return read_oom_kills(self.path, self.v2)

    def remove(self) -> None:
        """Move what is left up to the parent, then remove the cgroup (it must be empty)."""
        parent = self.path.parent / "cgroup.procs"
        for _ in range(50):
            pids = (self.path / "cgroup.procs").read_text().split()
            for pid in pids:
                with contextlib.suppress(OSError):  # exited meanwhile
                    parent.write_text(pid)
            try:
                os.rmdir(self.path)
                return
            except OSError:
                time.sleep(0.1)
        os.rmdir(self.path)
