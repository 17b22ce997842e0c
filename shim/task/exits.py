"""Matching the subreaper's exits to processes: a pid registry with early-exit memory.

runc create/exec/restore return a pid only after the process started, so the reaper may see it exit
before it is registered. Such an early exit is kept (the last 1024) and handed back at registration.
"""

from __future__ import annotations

import collections
import queue
import threading
from collections.abc import Callable

from shim.task.process import Process

EARLY_EXITS_KEPT = 1024


class ExitRegistry:
    def __init__(self, on_exit: Callable[[Process, int], None]) -> None:
        """on_exit(process, status) runs on the registry's own thread for every registered pid's exit."""
        self.on_exit = on_exit
        self._lock = threading.Lock()
        self._by_pid: dict[int, Process] = {}
        self._early: collections.OrderedDict[int, int] = collections.OrderedDict()
        self._exits: queue.Queue[tuple[int, int]] = queue.Queue()
        threading.Thread(target=self._loop, name="exits", daemon=True).start()

    def reaped(self, pid: int, status: int) -> None:
        """The subreaper's callback (any thread)."""
        self._exits.put((pid, status))

    def register(self, pid: int, proc: Process) -> int | None:
        """Map pid -> process; returns an exit status the reaper already saw for it (then the caller
        reports that exit itself, when its own events are out)."""
        with self._lock:
            early = self._early.pop(pid, None)
            if early is None:
                self._by_pid[pid] = proc
            return early

    def forget(self, pid: int) -> None:
        with self._lock:
            self._by_pid.pop(pid, None)

    def _loop(self) -> None:
        while True:
            pid, status = self._exits.get()
            with self._lock:
                proc = self._by_pid.pop(pid, None)
                if proc is None:
                    # Not registered (yet): runc create/exec may not have returned the pid file.
                    self._early[pid] = status
                    while len(self._early) > EARLY_EXITS_KEPT:
                        self._early.popitem(last=False)
                    continue
            self.on_exit(proc, status)
