"""Lazy restore, the store side: a checkpoint materialized with byte ranges left out, and their reader.

Store.get_deferred writes a checkpoint like Store.get but leaves the ranges its caller names (the lazy
pages of CRIU's page images) as holes. DeferSplit checks those ranges and cuts the files' chunk
references into what is written now and what is deferred; DeferredReader then serves any sub-range of
a deferred range, every chunk verified as a get verifies it, and after each read fetches the next
chunks in file order in the background, within a memory bound, so a sequential walk finds them ready.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .chunkcache import ChunkCache
from .errors import ChunkCorrupt, ManifestCorrupt, NotDeferred, StoreError
from .get_timing import GetTimings
from .limits import MAX_CHUNK_LEN, MAX_CHUNK_REFS
from .model import ZERO, Manifest

if TYPE_CHECKING:
    from .store import Store

log = logging.getLogger(__name__)

Span = tuple[int, int]  # (offset, length)
DEFAULT_MEMORY = 64 << 20  # chunk data a reader holds: cached plus being fetched
MAX_DEFER_RANGES = MAX_CHUNK_REFS  # ranges one get_deferred accepts over all files
MAX_READ = MAX_CHUNK_LEN  # the largest single read


def _merge(ranges: Iterable[Any], size: int, what: str) -> list[Span]:
    """The caller's ranges for one file, checked (ints, inside the file) and merged, in order."""
    out: list[Span] = []
    for r in sorted(_checked(ranges, size, what)):
        if out and r[0] <= out[-1][0] + out[-1][1]:
            last = out[-1]
            out[-1] = (last[0], max(last[0] + last[1], r[0] + r[1]) - last[0])
        else:
            out.append(r)
    return out


def _checked(ranges: Iterable[Any], size: int, what: str) -> Iterable[Span]:
    for r in ranges:
        try:
            off, length = r
        except (TypeError, ValueError):
            raise StoreError(f"{what}: deferred range {r!r:.80} is not (offset, length)") from None
        if type(off) is not int or type(length) is not int or off < 0 or length < 1 or off + length > size:
            raise StoreError(f"{what}: deferred range ({off!r:.20}, {length!r:.20}) is outside its {size} bytes")
        yield off, length


def _piece(ref: list[Any], lo: int, hi: int) -> list[Any]:
    """The part [lo, hi) of a chunk reference: the reference itself when whole, else a slice of its chunk."""
    off, length, digest = ref[:3]
    if lo == off and hi == off + length:
        return ref
    if digest == ZERO:
        return [lo, hi - lo, ZERO]
    coff, clen = (ref[3], ref[4]) if len(ref) == 5 else (0, length)
    return [lo, hi - lo, digest, coff + lo - off, clen]


def clip(refs: Sequence[list[Any]], ranges: Sequence[Span], what: str) -> tuple[list[list[Any]], list[list[Any]]]:
    """Split a file's references (ordered, not overlapping) by merged ranges: (to write now, deferred).

    Deferred zero references are dropped: a hole reads as zeros."""
    kept: list[list[Any]] = []
    deferred: list[list[Any]] = []
    j = 0
    end = 0
    for ref in refs:
        off, length = ref[0], ref[1]
        if off < end:
            raise ManifestCorrupt(f"{what}: chunk at {off} overlaps the one before (ending at {end})")
        end = off + length
        while j < len(ranges) and ranges[j][0] + ranges[j][1] <= off:
            j += 1
        pos = off
        k = j
        while k < len(ranges) and ranges[k][0] < end:
            lo, hi = max(ranges[k][0], off), min(ranges[k][0] + ranges[k][1], end)
            if pos < lo:
                kept.append(_piece(ref, pos, lo))
            if ref[2] != ZERO:
                deferred.append(_piece(ref, lo, hi))
            pos = hi
            k += 1
        if pos < end:
            kept.append(_piece(ref, pos, end))
    return kept, deferred


class DeferSplit:
    """The caller's choice of what to leave out of a get_deferred, turned into references.

    may_defer: relative path -> whether the file may have deferred ranges; defer: called with the partial
    root once every other file is written, returns path -> (offset, length) ranges not to fetch now."""

    def __init__(
        self, may_defer: Callable[[str], bool], defer: Callable[[Path], Mapping[str, Sequence[tuple[int, int]]]]
    ) -> None:
        self.may_defer = may_defer
        self.defer = defer
        # path -> (merged deferred ranges, deferred references), of the checkpoint last decided
        self.files: dict[str, tuple[list[Span], list[list[Any]]]] = {}
        self.deferred_bytes = 0

    def decide(self, m: Manifest, root: Path, files: Sequence[dict[str, Any]]) -> dict[str, list[list[Any]]]:
        """Ask the caller, check its answer; the references of `files` to write now, by path."""
        what = f"get_deferred of {m.key!r} seq {m.seq}"
        entries = {e["path"]: e for e in files}
        asked = self.defer(root)
        self.files, self.deferred_bytes = {}, 0
        count = 0
        now: dict[str, list[list[Any]]] = {}
        for path, ranges in asked.items():
            e = entries.get(path)
            if e is None:
                raise StoreError(f"{what}: deferred ranges for {path!r:.200}, not a file that may be deferred")
            merged = _merge(ranges, e["size"], f"{what}, file {path}")
            count += len(merged)
            if count > MAX_DEFER_RANGES:
                raise StoreError(f"{what}: more than {MAX_DEFER_RANGES} deferred ranges")
            if not merged:
                continue
            kept, deferred = clip(e["chunks"], merged, f"{what}, file {path}")
            now[path] = kept
            self.files[path] = (merged, deferred)
            self.deferred_bytes += sum(r[1] for r in e["chunks"]) - sum(r[1] for r in kept)
        return now


class _Passed(Exception):
    """A read-ahead fetch no longer needed."""


@dataclass(frozen=True, slots=True)
class _Unit:
    """One chunk fetch, in file order: consecutive pieces of one chunk share it."""

    digest: str
    clen: int
    where: str


@dataclass(frozen=True, slots=True)
class _Piece:
    start: int
    length: int
    unit: int
    coff: int  # where its bytes start in the unit's chunk


class _File:
    def __init__(self, ranges: list[Span]) -> None:
        self.ranges = ranges
        self.range_starts = [r[0] for r in ranges]
        self.pieces: list[_Piece] = []
        self.piece_starts: list[int] = []


class DeferredReader:
    """Verified bytes of a get_deferred's deferred ranges, with a bounded background read-ahead.

    Memory: chunk data held (cached plus being fetched) stays within memory_limit as far as read-ahead is
    concerned: a quarter of it is the read-ahead window, the rest the cache; a read that must wait for a
    chunk fetches it even beyond the bound (a faulting page cannot wait), one chunk per concurrent read.
    The backend's own ranged-read window cache (packs) is not counted here.

    Thread-safe. It uses the store until close(): close the reader before the store.
    """

    def __init__(
        self,
        store: Store,
        m: Manifest,
        files: Mapping[str, tuple[list[Span], list[list[Any]]]],
        memory_limit: int = DEFAULT_MEMORY,
    ) -> None:
        self._store = store
        self._sealed = m.sealed_with
        self._units: list[_Unit] = []
        self._files: dict[str, _File] = {}
        for path, (ranges, refs) in files.items():
            f = self._files[path] = _File(ranges)
            for ref in refs:
                digest, clen = ref[2], ref[4] if len(ref) == 5 else ref[1]
                if not self._units or self._units[-1].digest != digest:
                    where = f"{m.key!r} seq {m.seq}, file {path} offset {ref[0]} (deferred)"
                    self._units.append(_Unit(digest, clen, where))
                f.pieces.append(_Piece(ref[0], ref[1], len(self._units) - 1, ref[3] if len(ref) == 5 else 0))
                f.piece_starts.append(ref[0])
        self.memory_limit = memory_limit
        self._ahead_limit = memory_limit // 4
        self._cache = ChunkCache(memory_limit - self._ahead_limit)
        self._lock = threading.Lock()
        self._ahead: dict[int, Future[None]] = {}  # unit -> its read-ahead, until a read asks for it
        self._ahead_bytes = 0  # their chunks' bytes
        self._next = 0  # the first unit read-ahead has not considered yet
        self._ends = list(itertools.accumulate(u.clen for u in self._units))  # bytes of units [0, i]
        self._pool = ThreadPoolExecutor(max(1, store.workers), thread_name_prefix="revenant-lazy")
        self._closed = False
        self._timings = GetTimings()
        self._started = time.monotonic()
        self._inflight = 0
        self._peak = 0
        self._reads = self._served = self._read_ns = 0
        self._ahead_started = self._ahead_used = 0
        # Packed backends fetch the windows of these chunks ahead, in this order (ranged GETs).
        store.backend.plan_reads(u.digest for u in self._units if u.digest != ZERO)

    @property
    def ranges(self) -> dict[str, list[Span]]:
        """The deferred ranges (merged, in order), by path."""
        return {p: list(f.ranges) for p, f in self._files.items()}

    def read(self, path: str, offset: int, length: int) -> bytes:
        """The verified bytes [offset, offset + length) of path, which lie inside one deferred range."""
        started = time.monotonic_ns()
        if self._closed:
            raise StoreError("deferred reader is closed")
        f = self._files.get(path)
        if f is None:
            raise NotDeferred(f"{path!r:.200} has no deferred ranges")
        if type(offset) is not int or type(length) is not int or offset < 0 or not 0 < length <= MAX_READ:
            raise NotDeferred(f"read of {path!r:.200} at {offset!r:.20} of {length!r:.20} bytes: bad range")
        i = bisect.bisect_right(f.range_starts, offset) - 1
        if i < 0 or offset + length > f.ranges[i][0] + f.ranges[i][1]:
            raise NotDeferred(f"{path!r:.200} [{offset}, +{length}) is not inside one deferred range")
        end = offset + length
        out = bytearray(length)  # zeros: holes and zero chunks stay so
        k = max(0, bisect.bisect_right(f.piece_starts, offset) - 1)
        last = -1
        while k < len(f.pieces) and f.pieces[k].start < end:
            p = f.pieces[k]
            lo, hi = max(p.start, offset), min(p.start + p.length, end)
            if lo < hi:
                data = self._chunk(p.unit)
                src = p.coff + lo - p.start
                if src + hi - lo > len(data):  # the manifest check bounds slices; a short chunk fails verification
                    raise StoreError(f"chunk {self._units[p.unit].digest} has no bytes at {src} of {hi - lo}")
                out[lo - offset : hi - offset] = memoryview(data)[src : src + hi - lo]
                last = p.unit
            k += 1
        with self._lock:
            self._reads += 1
            self._served += length
            self._read_ns += time.monotonic_ns() - started
        if last >= 0:
            self._read_ahead(last + 1)
        return bytes(out)

    def _chunk(self, unit: int) -> bytes:
        u = self._units[unit]
        with self._lock:
            if self._drop(unit):
                self._ahead_used += 1
        return self._cache.get(u.digest, lambda: self._load(u))

    def _load(self, u: _Unit, ahead: int | None = None) -> bytes:
        """Fetch and verify u; ahead: the unit a read-ahead fetches it for, which must still be ahead (checked
        while the cache counts this as the chunk's one load, so a read either waits for it or loads itself)."""
        with self._lock:
            if ahead is not None and (self._closed or ahead not in self._ahead):
                raise _Passed
            self._inflight += u.clen
            self._peak = max(self._peak, self._cache.size + self._inflight)
        try:
            return self._store._fetch_verified(u.digest, u.clen, u.where, self._sealed, self._timings)
        finally:
            with self._lock:
                self._inflight -= u.clen

    def _read_ahead(self, start: int) -> None:
        """Start fetching the chunks from unit `start` (the one after a read's last) that fit the window:
        the next ahead_limit bytes of chunks, at most ahead_limit of them fetched and not yet read.

        Each call walks only the units no earlier call considered (a read runs this after every request:
        rescanning the whole window each time cost more than the reads themselves)."""
        with self._lock:
            if self._closed:
                return
            end = bisect.bisect_right(
                self._ends, self._ends[start - 1] + self._ahead_limit if start else self._ahead_limit
            )
            unit = self._next if start <= self._next <= end else start  # a jump: start over there
            while unit < end:
                u = self._units[unit]
                if unit not in self._ahead and u.digest not in self._cache:
                    if self._ahead_bytes + u.clen > self._ahead_limit:
                        self._prune(start)
                        if self._ahead_bytes + u.clen > self._ahead_limit:
                            break  # the window is full: the next read goes on from here
                    self._ahead_bytes += u.clen
                    self._ahead_started += 1
                    self._ahead[unit] = self._pool.submit(self._prefetch, unit)
                unit += 1
            self._next = unit

    def _prune(self, start: int) -> None:
        """Forget read-ahead passed by the reads (unless being fetched) or fetched and evicted since (caller
        holds _lock)."""
        for unit, fut in list(self._ahead.items()):
            if (unit < start and (fut.done() or fut.cancel())) or (
                fut.done() and self._units[unit].digest not in self._cache
            ):
                self._drop(unit)

    def _drop(self, unit: int) -> bool:
        """Unit no longer ahead (caller holds _lock); whether it was."""
        if self._ahead.pop(unit, None) is None:
            return False
        self._ahead_bytes -= self._units[unit].clen
        return True

    def _prefetch(self, unit: int) -> None:
        u = self._units[unit]
        try:
            self._cache.get(u.digest, lambda: self._load(u, unit))
        except _Passed:  # a read got to it first (and fetched it itself) or passed it while this waited
            pass
        except Exception as e:  # a read of this chunk fetches it again and raises
            log.debug("read-ahead of chunk %s failed: %s", u.digest, e)

    def check_present(self) -> None:
        """Every deferred chunk is in the store's chunk listing (one listing; a backend that cannot list is
        trusted): a missing one is ChunkCorrupt. Damage inside a chunk shows only when it is read."""
        store = self._store
        names = store.backend.retry("list chunks", store._chunk_names)
        if names is None:
            return
        for u in self._units:
            if u.digest != ZERO and u.digest not in names:
                raise ChunkCorrupt(u.digest, "is missing", u.where)

    def stats(self) -> dict[str, Any]:
        """What the reader did, for logs: reads, bytes served and fetched, read-ahead, memory held."""
        t = self._timings.as_dict()
        with self._lock:
            return {
                "reads": self._reads,
                "bytes_served": self._served,
                "chunks_fetched": self._cache.loads,
                "bytes_fetched": t["bytes_fetched"],
                "ahead_started": self._ahead_started,
                "ahead_used": self._ahead_used,
                "held_bytes": self._cache.size + self._inflight,
                "held_peak": self._peak,
                "memory_limit": self.memory_limit,
                "read_wait_ms": round(self._read_ns / 1e6, 1),
                "wall_ms": round((time.monotonic() - self._started) * 1000, 1),
                **{k: t[k] for k in ("fetch_ms", "open_ms", "decode_ms", "verify_ms")},
            }

    def close(self) -> None:
        """Stop the read-ahead, wait for its fetches, drop every cached chunk; reads fail from then on."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._ahead.clear()
            self._ahead_bytes = 0
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._cache.clear()
        log.info("deferred reader closed: %s", self.stats())

    def __enter__(self) -> DeferredReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
