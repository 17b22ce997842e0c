"""Chunks shared by many slice references, fetched once per restore and kept within a byte bound."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable

DEFAULT_LIMIT = 128 << 20


class ChunkCache:
    """Least-recently-used chunk data by digest; concurrent requests for one digest share one load.

    A chunk larger than the whole bound is loaded and handed out but not kept.
    """

    def __init__(self, limit: int = DEFAULT_LIMIT) -> None:
        self.limit = limit
        self.size = 0
        self.loads = 0
        self._data: OrderedDict[str, bytes] = OrderedDict()
        self._loading: dict[str, threading.Event] = {}
        self._lock = threading.Lock()

    def get(self, digest: str, load: Callable[[], bytes]) -> bytes:
        while True:
            with self._lock:
                data = self._data.get(digest)
                if data is not None:
                    self._data.move_to_end(digest)
                    return data
                ev = self._loading.get(digest)
                if ev is None:
                    ev = self._loading[digest] = threading.Event()
                    break
            ev.wait()  # another thread loads it; if that load failed, try ourselves
        try:
            data = load()
            with self._lock:
                self.loads += 1
                if len(data) <= self.limit:
                    self._data[digest] = data
                    self.size += len(data)
                    while self.size > self.limit:
                        _d, old = self._data.popitem(last=False)
                        self.size -= len(old)
            return data
        finally:
            with self._lock:
                del self._loading[digest]
            ev.set()
