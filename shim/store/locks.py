"""Lock objects in the backend: who is writing (puts) or collecting (gc), and whether they are alive.

Puts never wait for gc. Each put holds `put-<nonce>` and each gc `gc-<nonce>`, rewritten by a heartbeat
thread every stale_after/4 (the body changes each time: a beat counter). gc yields to puts: it does not
sweep while a live put lock exists and re-checks before every deletion (store.py says why that is safe).

Liveness never compares the writer's clock with the reader's: a lock is stale when
- the backend's own clock says it was last written stale_after ago or more (file: the lock file's mtime
  against a probe file's mtime on the same file system; S3: LastModified against the response's Date), or
- this observer has watched it stay unchanged for stale_after on its own monotonic clock (every backend,
  the only rule where the backend reports no times).
The `time` in the body is for people reading it, never for decisions.

A holder whose heartbeat could not rewrite the lock for stale_after (measured from the start of its last
successful write, on its own monotonic clock) has lost it: `check()` raises LockLost, and a put calls it
right before committing.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time

from ..faults import fail_point
from .backends.base import Backend
from .errors import LockLost, StoreError

log = logging.getLogger(__name__)


class LockWatcher:
    """Judges other processes' locks by what this process observes, kept across calls."""

    def __init__(self, backend: Backend, stale_after: float) -> None:
        self.backend = backend
        self.stale_after = stale_after
        self._seen: dict[str, tuple[str, float]] = {}  # name -> (fingerprint, monotonic time it changed)
        self._mu = threading.Lock()

    def live(self, prefix: str, exclude: str = "") -> list[str]:
        states = self.backend.retry("list locks", self.backend.lock_states)
        now = time.monotonic()
        out = []
        with self._mu:
            present = set()
            for st in states:
                present.add(st.name)
                seen = self._seen.get(st.name)
                if seen is None or seen[0] != st.fingerprint:
                    seen = self._seen[st.name] = (st.fingerprint, now)
                if not st.name.startswith(prefix) or st.name == exclude:
                    continue
                if st.age is not None and st.age >= self.stale_after:
                    continue
                if now - seen[1] >= self.stale_after:
                    continue
                out.append(st.name)
            for gone in set(self._seen) - present:
                del self._seen[gone]
        return sorted(out)


class HeldLock:
    """A lock this process holds: written on enter, rewritten by a heartbeat thread, removed on exit."""

    def __init__(self, backend: Backend, name: str, stale_after: float) -> None:
        self.backend = backend
        self.name = name
        self.stale_after = stale_after
        self._beat = 0
        self._valid_until = 0.0  # monotonic; start of the last successful write + stale_after
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _write(self) -> None:
        self._beat += 1
        body = {"host": socket.gethostname(), "pid": os.getpid(), "beat": self._beat, "time": time.time()}
        started = time.monotonic()
        fail_point("store.lock.refresh" if self._beat > 1 else "store.lock.write")
        self.backend.put_lock(self.name, json.dumps(body).encode())
        self._valid_until = started + self.stale_after

    def __enter__(self) -> HeldLock:
        self.backend.retry("write lock", self._write)
        self._thread = threading.Thread(target=self._heartbeat, name="revenant-lock-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.stale_after / 4):
            try:
                self.backend.retry("refresh lock", self._write)
            except (StoreError, OSError) as e:  # check() turns a lapse into LockLost
                log.warning("refreshing lock %s failed: %s", self.name, e)

    def check(self, what: str) -> None:
        """Raise LockLost unless the lock stays fresh for others a while yet (a quarter of stale_after:
        time for the commit that follows)."""
        late = time.monotonic() + self.stale_after / 4 - self._valid_until
        if late >= 0:
            raise LockLost(
                f"{what}: lock {self.name} on {self.backend.url} was not refreshed for "
                f"{self.stale_after * 0.75 + late:.1f}s (stale after {self.stale_after:.0f}s); stopping before commit"
            )

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()
        try:
            self.backend.retry("remove lock", lambda: self.backend.delete_lock(self.name))
        except StoreError as e:  # a stale lock only delays gc; never fail an operation for it
            log.warning("could not remove lock %s: %s", self.name, e)
