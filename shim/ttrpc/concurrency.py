"""The two thread helpers of the ttrpc server: a deadline watcher and a reusing thread launcher."""

from __future__ import annotations

import heapq
import itertools
import queue
import threading
import time
from collections.abc import Callable
from typing import Protocol


class Expirable(Protocol):
    @property
    def answered(self) -> bool: ...

    def expire(self) -> None: ...


class DeadlineWatcher:
    """One thread per server that answers DeadlineExceeded for calls still running at their deadline.

    The handler thread itself keeps running (Python threads cannot be cancelled); its late result is
    dropped because the call was already answered.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, Expirable]] = []
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None
        self._stopped = False
        self._compact_at = 1024

    def add(self, deadline: float, call: Expirable) -> None:
        with self._cond:
            if self._stopped:
                return
            if len(self._heap) >= self._compact_at:
                # Calls answered long before their deadline would otherwise stay until it passes.
                self._heap = [entry for entry in self._heap if not entry[2].answered]
                heapq.heapify(self._heap)
                self._compact_at = max(1024, 2 * len(self._heap))
            heapq.heappush(self._heap, (deadline, next(self._seq), call))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="ttrpc-deadlines", daemon=True)
                self._thread.start()
            self._cond.notify()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._heap.clear()
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while True:
                    if self._stopped:
                        return
                    if not self._heap:
                        self._cond.wait()
                        continue
                    left = self._heap[0][0] - time.monotonic()
                    if left <= 0:
                        call = heapq.heappop(self._heap)[2]
                        break
                    self._cond.wait(left)
            call.expire()


class Workers:
    """Runs every submitted call at once on its own thread, reusing idle threads to save start-up.

    Unlike a fixed pool nothing ever queues behind a busy thread: with no idle thread a new one starts.
    Threads idle for `idle_timeout` seconds exit, so a burst does not leave threads behind.
    """

    def __init__(self, idle_timeout: float = 30.0) -> None:
        self._idle_timeout = idle_timeout
        self._lock = threading.Lock()
        self._idle = 0  # waiting threads not yet promised a job
        self._jobs: queue.SimpleQueue[tuple[Callable[..., None], tuple[object, ...]] | None] = queue.SimpleQueue()

    def stop(self) -> None:
        """Let idle threads exit now; running ones finish their call, then exit when idle too."""
        with self._lock:
            for _ in range(self._idle):
                self._jobs.put(None)
            self._idle = 0

    def submit(self, fn: Callable[..., None], *args: object) -> None:
        with self._lock:
            if self._idle:
                self._idle -= 1
                self._jobs.put((fn, args))
                return
        threading.Thread(target=self._run, args=(fn, args), name="ttrpc-handler", daemon=True).start()

    def _run(self, fn: Callable[..., None], args: tuple[object, ...]) -> None:
        while True:
            fn(*args)
            with self._lock:
                self._idle += 1
            try:
                job = self._jobs.get(timeout=self._idle_timeout)
            except queue.Empty:
                with self._lock:
                    # A job promised to an idle thread may have arrived just now: take it, else retire.
                    try:
                        job = self._jobs.get_nowait()
                    except queue.Empty:
                        self._idle -= 1
                        return
            if job is None:
                return
            fn, args = job
