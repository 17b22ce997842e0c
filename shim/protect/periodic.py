"""Periodic leave-running checkpoints of one container.

The next checkpoint is due one interval after the previous one finished, so a slow upload never
stacks checkpoints on top of each other; a failure is logged and retried at the next interval.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from shim.protect.policy import MAX_INTERVAL_S

log = logging.getLogger(__name__)


class PeriodicCheckpoints:
    def __init__(self, name: str, interval_s: float, take: Callable[[], object]) -> None:
        if not 0 < interval_s <= MAX_INTERVAL_S:
            # threading's wait() overflows on absurd timeouts, which would end the thread silently.
            raise ValueError(f"interval must be positive and at most {MAX_INTERVAL_S:.0f}s, got {interval_s}")
        self.name = name
        self.interval_s = interval_s
        self._take = take
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"periodic-{name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=1.0)  # a checkpoint in flight finishes on its own

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self._take()
            except Exception as e:  # a failed periodic checkpoint must not end the protection
                log.error("periodic checkpoint of %s failed: %s", self.name, e)
