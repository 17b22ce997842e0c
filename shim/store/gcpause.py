"""Python's cyclic garbage collector paused while a large manifest is decoded and turned into a restore.

A large job's manifest is hundreds of thousands of small lists and ints: decoding it, splitting it for a
lazy restore and indexing its deferred references allocate that many objects again, and each collection
the allocations trigger walks every live object of the shim (measured: a third of get_deferred's time for
a 1 GiB job, more in a shim with a larger heap). Nothing built there forms a cycle, so collecting can
wait for the end. Nested and concurrent pauses keep the collector off until the last one ends; a
collector someone else disabled stays disabled."""

from __future__ import annotations

import contextlib
import gc
import threading
from collections.abc import Iterator

_lock = threading.Lock()
_depth = 0
_was_enabled = False


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    global _depth, _was_enabled
    with _lock:
        if _depth == 0:
            _was_enabled = gc.isenabled()
            gc.disable()
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _was_enabled:
                gc.enable()
