"""Where the seconds of a Store.get go.

A get fetches, opens (encrypted stores), decodes, verifies and writes every chunk on a pool of worker
threads. GetTimings sums each part's thread time over all chunks (so the parts add up to more than the
wall time when the workers overlap: `overlap` = summed parts / wall) and keeps each file's span, from
its creation to its last chunk written. The parts:

    fetch_s    the backend's get_chunk: a pack window's ranged GET (or the wait for another thread's),
               a file read, a registry blob
    open_s     decrypting a sealed chunk (0 for a plaintext store)
    decode_s   zstd decompression
    verify_s   BLAKE3 of the decoded data against the chunk's id
    write_s    pwrite into the restored file
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

PARTS = ("fetch_s", "open_s", "decode_s", "verify_s", "write_s")
SLOWEST_FILES = 5  # files named in as_dict(), the slowest first


@dataclass
class FileSpan:
    path: str
    size: int
    start: float
    end: float = 0.0

    @property
    def seconds(self) -> float:
        return max(0.0, self.end - self.start)


@dataclass
class GetTimings:
    parts: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PARTS, 0.0))
    chunks: int = 0  # chunk references restored, holes included
    zero_chunks: int = 0
    bytes_fetched: int = 0  # stored (compressed, sealed) bytes
    bytes_written: int = 0
    wall_s: float = 0.0
    files: list[FileSpan] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def reset(self) -> None:
        """Forget what was measured (a get that starts over, e.g. from another copy)."""
        with self._lock:
            self.parts = dict.fromkeys(PARTS, 0.0)
            self.chunks = self.zero_chunks = self.bytes_fetched = self.bytes_written = 0
            self.wall_s = 0.0
            self.files = []

    def add(self, part: str, seconds: float) -> None:
        with self._lock:
            self.parts[part] += seconds

    def fetched(self, stored_bytes: int) -> None:
        """One chunk object fetched and verified (a chunk that slices share is fetched once)."""
        with self._lock:
            self.bytes_fetched += stored_bytes

    def wrote(self, length: int) -> None:
        """One chunk reference written into its file."""
        with self._lock:
            self.chunks += 1
            self.bytes_written += length

    def zero(self) -> None:
        with self._lock:
            self.chunks += 1
            self.zero_chunks += 1

    def file(self, path: str, size: int) -> FileSpan:
        span = FileSpan(path, size, time.monotonic())
        with self._lock:
            self.files.append(span)
        return span

    def as_dict(self) -> dict[str, Any]:
        with self._lock:
            busy = sum(self.parts.values())
            slowest = sorted(self.files, key=lambda f: f.seconds, reverse=True)[:SLOWEST_FILES]
            return {
                "wall_ms": round(self.wall_s * 1000, 1),
                **{p.replace("_s", "_ms"): round(v * 1000, 1) for p, v in self.parts.items()},
                "overlap": round(busy / self.wall_s, 2) if self.wall_s > 0 else 0.0,
                "chunks": self.chunks,
                "zero_chunks": self.zero_chunks,
                "bytes_fetched": self.bytes_fetched,
                "bytes_written": self.bytes_written,
                "files": len(self.files),
                "slowest_files": [{"path": f.path, "bytes": f.size, "ms": round(f.seconds * 1000, 1)} for f in slowest],
            }


class Stopwatch:
    """Adds the time between successive lap() calls to a GetTimings' parts (no-op without one)."""

    __slots__ = ("last", "timings")

    def __init__(self, timings: GetTimings | None) -> None:
        self.timings = timings
        self.last = time.perf_counter() if timings is not None else 0.0

    def lap(self, part: str) -> None:
        if self.timings is None:
            return
        now = time.perf_counter()
        self.timings.add(part, now - self.last)
        self.last = now
