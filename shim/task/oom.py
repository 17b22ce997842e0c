"""OOM notifications for cgroup v1 memory controllers (this machine's hierarchy): an eventfd
registered through cgroup.event_control fires on every OOM in the container's cgroup; the watcher
publishes TaskOOM for it. The eventfd also fires when the cgroup is removed, so a wake-up counts
as an OOM only if the cgroup still exists and its oom_kill counter moved."""

from __future__ import annotations

import contextlib
import logging
import os
import select
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)

MEMORY_ROOT = "/sys/fs/cgroup/memory"


def memory_cgroup_of(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            for line in f:
                _, controllers, path = line.rstrip("\n").split(":", 2)
                if "memory" in controllers.split(","):
                    return os.path.join(MEMORY_ROOT, path.lstrip("/"))
    except OSError:
        return None
    return None


def _oom_kills(cgroup: str) -> int:
    """The cgroup's oom_kill counter; -1 where the kernel does not report one."""
    try:
        with open(os.path.join(cgroup, "memory.oom_control")) as f:
            for line in f:
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
    except (OSError, ValueError):
        pass
    return -1


class _Watch:
    def __init__(self, container_id: str, cgroup: str, efd: int, control_fd: int) -> None:
        self.container_id, self.cgroup, self.efd, self.control_fd = container_id, cgroup, efd, control_fd
        self.kills = _oom_kills(cgroup)

    def close(self) -> None:
        for fd in (self.efd, self.control_fd):
            with contextlib.suppress(OSError):
                os.close(fd)


class OOMWatcher:
    def __init__(self, on_oom: Callable[[str], None]) -> None:
        self.on_oom = on_oom
        self._lock = threading.Lock()
        self._watches: dict[int, _Watch] = {}
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._thread: threading.Thread | None = None

    def add(self, container_id: str, pid: int) -> None:
        """Watch the memory cgroup of `pid`; failures only cost the OOM event, never the task."""
        cgroup = memory_cgroup_of(pid)
        if cgroup is None or not os.path.exists(os.path.join(cgroup, "cgroup.event_control")):
            log.debug("no cgroup v1 memory controller for %s: no OOM events", container_id)
            return
        try:
            efd = os.eventfd(0, os.EFD_CLOEXEC)
            control_fd = os.open(os.path.join(cgroup, "memory.oom_control"), os.O_RDONLY | os.O_CLOEXEC)
            with open(os.path.join(cgroup, "cgroup.event_control"), "w") as f:
                f.write(f"{efd} {control_fd}")
        except OSError as e:
            log.warning("OOM events for %s unavailable: %s", container_id, e)
            return
        with self._lock:
            self._watches[efd] = _Watch(container_id, cgroup, efd, control_fd)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="oom", daemon=True)
                self._thread.start()
        os.write(self._wake_w, b"x")
        log.debug("watching %s for OOM kills (eventfd %d)", cgroup, efd)

    def remove(self, container_id: str) -> None:
        with self._lock:
            for efd, watch in list(self._watches.items()):
                if watch.container_id == container_id:
                    del self._watches[efd]
                    watch.close()
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    def _run(self) -> None:
        while True:
            with self._lock:
                fds = list(self._watches)
            try:
                ready, _, _ = select.select([self._wake_r, *fds], [], [])
            except OSError:  # a watch closed under select: rebuild the list
                continue
            if self._wake_r in ready:
                with contextlib.suppress(BlockingIOError):
                    os.read(self._wake_r, 512)
            for fd in ready:
                if fd != self._wake_r:
                    self._fired(fd)

    def _fired(self, efd: int) -> None:
        with self._lock:
            watch = self._watches.get(efd)
        if watch is None:
            return
        with contextlib.suppress(OSError):
            os.read(efd, 8)
        if not os.path.exists(watch.cgroup):  # the cgroup went away
            with self._lock:
                self._watches.pop(efd, None)
            watch.close()
            return
        self._check(watch, always_if_unknown=True)

    def check(self, container_id: str) -> None:
        """Report an OOM kill not reported yet. Called when a task's init exits, before its exit is
        published: the cgroup still exists then, whereas the eventfd thread may run only after runc
        removed it (a busy machine) and could no longer tell an OOM from the removal."""
        with self._lock:
            watches = [w for w in self._watches.values() if w.container_id == container_id]
        for watch in watches:
            self._check(watch, always_if_unknown=False)

    def _check(self, watch: _Watch, always_if_unknown: bool) -> None:
        with self._lock:
            kills = _oom_kills(watch.cgroup)
            fired = kills > watch.kills if kills >= 0 else always_if_unknown
            if fired:
                watch.kills = kills
        if fired:
            log.info("OOM in %s", watch.container_id)
            self.on_oom(watch.container_id)
