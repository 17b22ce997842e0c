"""Writer/GC exclusion through lock objects in the backend (the restic scheme, simplified).

A put holds a shared `put-<nonce>` lock (refreshed while it runs); GC takes `gc-<nonce>` and sweeps only
if no live put lock exists, otherwise it backs off. A put that sees a live GC lock waits for it. Locks not
refreshed for `stale_after` seconds belong to crashed processes and are ignored.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time

from .backends.base import Backend
from .errors import StoreError

log = logging.getLogger(__name__)


def _lock_body() -> bytes:
    return json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}).encode()


def live_locks(backend: Backend, prefix: str, stale_after: float, exclude: str = "") -> list[str]:
    now = time.time()
    out = []
    for name, body in backend.retry("list locks", backend.list_locks):
        if not name.startswith(prefix) or name == exclude:
            continue
        try:
            t = float(json.loads(body)["time"])
        except (ValueError, KeyError, TypeError):
            t = 0.0
        if now - t < stale_after:
            out.append(name)
    return out


class PutLock:
    def __init__(self, backend: Backend, nonce: str, stale_after: float, wait_gc: float = 600.0) -> None:
        self.backend = backend
        self.name = f"put-{nonce}"
        self.stale_after = stale_after
        self.wait_gc = wait_gc
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PutLock:
        self.backend.retry("write lock", lambda: self.backend.put_lock(self.name, _lock_body()))
        deadline = time.monotonic() + self.wait_gc
        while gcs := live_locks(self.backend, "gc-", self.stale_after):
            if time.monotonic() > deadline:
                self._release()
                raise StoreError(f"{self.backend.url}: garbage collection {gcs} still running; put gave up")
            log.info("waiting for garbage collection %s to finish", gcs)
            time.sleep(0.2)
        self._thread = threading.Thread(target=self._refresh, name="revenant-lock-refresh", daemon=True)
        self._thread.start()
        return self

    def _refresh(self) -> None:
        while not self._stop.wait(self.stale_after / 4):
            try:
                self.backend.put_lock(self.name, _lock_body())
            except StoreError as e:
                log.warning("refreshing lock %s failed: %s", self.name, e)

    def _release(self) -> None:
        try:
            self.backend.retry("remove lock", lambda: self.backend.delete_lock(self.name))
        except StoreError as e:  # a stale lock only delays GC; never fail a put for it
            log.warning("could not remove lock %s: %s", self.name, e)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()
        self._release()
