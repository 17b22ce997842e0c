"""Which of a container's processes use CUDA: those whose open files or memory maps reference /dev/nvidia*.

The pids come from the container's cgroup (cgroup.procs) or `runc ps`. Only thread-group leaders count:
the checkpoint API also accepts a thread id and then acts on the whole process (NVIDIA/cuda-checkpoint#41),
so handing it a thread would lock one process twice.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

log = logging.getLogger(__name__)

DEVICE_PREFIX_ENV = "REVENANT_GPU_DEVICE_PREFIX"  # colon-separated list; tests point it at a fake device file
DEFAULT_DEVICE_PREFIXES = ("/dev/nvidia",)


def device_prefixes() -> tuple[str, ...]:
    raw = os.environ.get(DEVICE_PREFIX_ENV, "")
    found = tuple(p for p in raw.split(":") if p)
    return found or DEFAULT_DEVICE_PREFIXES


@dataclass(frozen=True)
class ProcRef:
    """A process, pinned by its start time so a recycled pid is never mistaken for it."""

    pid: int
    start_time: int  # field 22 of /proc/<pid>/stat, clock ticks since boot

    def alive(self) -> bool:
        st = start_time(self.pid)
        return st is not None and st == self.start_time


def start_time(pid: int) -> int | None:
    """Start time of a live (non-zombie) process, None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    # comm (field 2) may hold spaces and parentheses: split after the last ')'.
    fields = data[data.rindex(b")") + 2 :].split()
    if fields[0] in (b"Z", b"X"):
        return None
    return int(fields[19])


def _is_thread_group_leader(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Tgid:"):
                    return int(line.split()[1]) == pid
    except OSError:
        return False
    return False


def references_device(pid: int, prefixes: Sequence[str]) -> bool:
    """True when an fd or a mapping of pid names a path under one of prefixes."""
    fd_dir = f"/proc/{pid}/fd"
    try:
        fds = os.listdir(fd_dir)
    except OSError:
        fds = []
    for fd in fds:
        try:
            target = os.readlink(f"{fd_dir}/{fd}")
        except OSError:
            continue  # closed while we looked
        if target.startswith(tuple(prefixes)):
            return True
    try:
        with open(f"/proc/{pid}/maps") as f:
            for line in f:
                parts = line.split(maxsplit=5)
                if len(parts) == 6 and parts[5].rstrip("\n").startswith(tuple(prefixes)):
                    return True
    except OSError:
        pass
    return False


def find_cuda_processes(pids: Iterable[int], prefixes: Sequence[str] | None = None) -> list[ProcRef]:
    """The CUDA processes among pids, in ascending pid order; gone pids and threads are skipped."""
    prefixes = tuple(prefixes) if prefixes else device_prefixes()
    found: list[ProcRef] = []
    for pid in sorted(set(int(p) for p in pids)):
        st = start_time(pid)
        if st is None or not _is_thread_group_leader(pid):
            continue
        if references_device(pid, prefixes) and start_time(pid) == st:
            found.append(ProcRef(pid, st))
    log.debug("CUDA processes among %s (prefixes %s): %s", pids, prefixes, [p.pid for p in found])
    return found


def rss_bytes(pid: int) -> int | None:
    """VmRSS of pid; after cuCheckpointProcessCheckpoint the GPU memory sits in host memory and shows here."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None
