"""How long the shim process lives: its containers, reservations and linger.

After its last container the shim lingers `linger` seconds for the next one, then exits. `start`
reserves a place for a container first (revenant.shim.v1.Shim/Reserve), so a lingering shim does not
exit under a container about to be created; a reservation that containerd never follows with Create
expires after RESERVATION_TTL. Once exiting, the shim refuses reservations and containers.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from shim.errors import FailedPrecondition

log = logging.getLogger(__name__)

RESERVATION_TTL = 60.0  # a reserved container that containerd never creates stops holding the shim


class ShimLifetime:
    def __init__(self, linger: float, on_shutdown: Callable[[], None]) -> None:
        self.linger = linger
        self.on_shutdown = on_shutdown
        self._lock = threading.Lock()
        self._live: set[str] = set()  # containers admitted and not yet released
        self._reserved: dict[str, float] = {}  # container id -> monotonic expiry
        self._exiting = False
        self._linger_timer: threading.Timer | None = None

    def reserve(self, cid: str) -> None:
        """A container is about to be created here: stay up for it (RESERVATION_TTL at most)."""
        with self._lock:
            if self._exiting:
                raise FailedPrecondition("this shim is shutting down")
            self._reserved[cid] = time.monotonic() + RESERVATION_TTL
            self._cancel_linger()
            self._arm_linger()  # expires the reservation if containerd never creates the task

    def admit(self, cid: str) -> None:
        """A container is being created (FailedPrecondition once the shim is exiting)."""
        with self._lock:
            if self._exiting:
                raise FailedPrecondition("this shim is shutting down")
            self._live.add(cid)
            self._reserved.pop(cid, None)
            self._cancel_linger()

    def release(self, cid: str) -> None:
        """A container is gone (deleted, or its Create failed)."""
        with self._lock:
            self._live.discard(cid)

    def shutdown_requested(self, now: bool) -> None:
        """containerd's Shutdown: exit when no container is left, after the linger unless `now`."""
        with self._lock:
            if self._live:
                return  # other tasks still live here
            if self.linger > 0 and not now:
                self._arm_linger()
                return
        self._exit_if_idle()

    def _cancel_linger(self) -> None:
        if self._linger_timer is not None:
            self._linger_timer.cancel()
            self._linger_timer = None

    def _arm_linger(self) -> None:
        self._cancel_linger()
        delay = self.linger
        if self._reserved:
            delay = max(delay, min(self._reserved.values()) - time.monotonic())
        self._linger_timer = threading.Timer(max(delay, 0.01), self._exit_if_idle)
        self._linger_timer.daemon = True
        self._linger_timer.start()

    def _exit_if_idle(self) -> None:
        with self._lock:
            now = time.monotonic()
            self._reserved = {cid: t for cid, t in self._reserved.items() if t > now}
            if self._live or self._exiting:
                return
            if self._reserved:
                self._arm_linger()
                return
            self._exiting = True
            self._cancel_linger()
        log.info("no task left: shutting down")
        self.on_shutdown()
