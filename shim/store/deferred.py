"""Lazy restore, the store side: a checkpoint materialized with byte ranges left out, and their reader.

Store.get_deferred writes a checkpoint like Store.get but leaves the ranges its caller names (the lazy
pages of CRIU's page images) as holes. DeferSplit checks those ranges and cuts the files' chunk
references into what is written now and what is deferred; DeferredReader then fills the holes in the
background, in file order, every chunk verified as a get verifies it, and serves any sub-range of a
deferred range from the filled file, fetching what is not there yet at once, ahead of the fill.

Why fill the file rather than cache chunks in memory: a lazy restore's reads come in two streams, the
restored tasks' faults (anywhere, one page at a time, each one a task waiting) and the lazy-pages
daemon's walk over the rest. A bounded in-memory read-ahead restarted at every fault, its workers
fighting the faulting read for the GIL: 10-20 MB/s. Filled in file order at a get's speed, most faults
find their page on disk already (the scratch dir an eager get writes all of it to anyway).
"""

from __future__ import annotations

import bisect
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ChunkCorrupt, ManifestCorrupt, NotDeferred, StoreError
from .get_timing import GetTimings
from .limits import MAX_CHUNK_LEN, MAX_CHUNK_REFS
from .model import ZERO, Manifest

if TYPE_CHECKING:
    from .store import Store

log = logging.getLogger(__name__)

Span = tuple[int, int]  # (offset, length)
DEFAULT_MEMORY = 64 << 20  # chunk data the background fill holds at once (being fetched and written)
MAX_DEFER_RANGES = MAX_CHUNK_REFS  # ranges one get_deferred accepts over all files
MAX_READ = MAX_CHUNK_LEN  # the largest single read
FILL_WORKERS = 2


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


# Not frozen: a frozen dataclass sets each field through object.__setattr__, and a large job's reader makes
# one of each per deferred reference (~85k per GiB of pages) before CRIU may start.
@dataclass(slots=True)
class _Unit:
    """One chunk fetch: every deferred piece of that chunk, wherever it is, is written from it."""

    digest: str
    clen: int
    path: str  # where its first piece is, for errors
    offset: int


@dataclass(slots=True)
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
        self.fd = -1


class _Fill:
    """A unit's state: `started` once a thread fetches it (under the reader's lock), `done` once its bytes
    are in the file (or its fetch failed: error)."""

    __slots__ = ("done", "error", "started")

    def __init__(self, started: bool = False) -> None:
        self.started = started
        self.done = threading.Event()
        self.error: BaseException | None = None


class DeferredReader:
    """Fills a get_deferred's holes in the background and serves verified bytes of its deferred ranges.

    The fill fetches the deferred chunks in file order on the store's workers, at most memory_limit bytes
    of chunk data at once, and writes each one's pieces into the holes of the files under `root` (the
    get's destination, a 0700 directory of the caller's). A read waits for the units it needs: one the
    fill has not started is fetched by the reading thread itself, at once. Bytes on disk were verified
    before they were written. A unit that failed fails every read that needs it (and only those).

    Thread-safe. It uses the store until close(): close the reader before the store.
    """

    def __init__(
        self,
        store: Store,
        m: Manifest,
        files: Mapping[str, tuple[list[Span], list[list[Any]]]],
        root: Path,
        memory_limit: int = DEFAULT_MEMORY,
        fill: bool = True,
        fill_later: bool = False,
    ) -> None:
        self._store = store
        self._sealed = m.sealed_with
        self._units: list[_Unit] = []
        self._unit_pieces: list[list[tuple[_File, _Piece]]] = []
        self._files: dict[str, _File] = {}
        # One unit per distinct chunk, in the order of its first piece: an incremental checkpoint's pages
        # slice their parent's chunks all over the file, and each chunk is fetched once for all of them.
        self._what = f"{m.key!r} seq {m.seq}"
        unit_of: dict[str, int] = {}
        units, unit_pieces = self._units, self._unit_pieces
        for path, (ranges, refs) in files.items():
            f = self._files[path] = _File(ranges)
            pieces, starts = f.pieces, f.piece_starts
            for ref in refs:
                digest = ref[2]
                unit = unit_of.get(digest)
                sliced = len(ref) == 5
                if unit is None:
                    unit = unit_of[digest] = len(units)
                    units.append(_Unit(digest, ref[4] if sliced else ref[1], path, ref[0]))
                    unit_pieces.append([])
                piece = _Piece(ref[0], ref[1], unit, ref[3] if sliced else 0)
                pieces.append(piece)
                starts.append(ref[0])
                unit_pieces[unit].append((f, piece))
        self.memory_limit = memory_limit
        self._lock = threading.Lock()
        self._room = threading.Condition(self._lock)  # the fill waits here for in-flight bytes to drop
        self._fills: list[_Fill | None] = [None] * len(self._units)  # None: nobody has claimed the unit yet
        self._closed = False
        self._timings = GetTimings()
        self._started = time.monotonic()
        self._filled_at: float | None = None
        self._inflight = self._peak = 0
        self._reads = self._served = self._read_ns = 0
        self._by_fill = self._by_read = self._fetched = 0
        # Units handed to the pool and not begun: kept to two per worker, so a read never waits behind a
        # long queue (it takes a queued unit over instead) and the memory bound counts what is in flight.
        self._queued = 0
        self._depth = 2 * FILL_WORKERS
        self._root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            for path, f in self._files.items():
                f.fd = _open_below(self._root_fd, path)
        except BaseException:
            self._close_fds()
            raise
        # Few fill workers: each holds the GIL while it verifies, and every fault waits on it (the page
        # server's thread); the backend's pack reader fetches ahead on its own threads anyway.
        self._pool = ThreadPoolExecutor(min(FILL_WORKERS, max(1, store.workers)), thread_name_prefix="revenant-lazy")
        # Packed backends fetch the windows of these chunks ahead, in this order (ranged GETs).
        store.backend.plan_reads(u.digest for u in self._units if u.digest != ZERO)
        self._filler: threading.Thread | None = None
        self._fill_started = False
        if fill:  # else every byte is fetched by the read that needs it
            self._filler = threading.Thread(target=self._fill_all, name="revenant-lazy-fill", daemon=True)
            if not fill_later:
                self.start_fill()

    def start_fill(self) -> None:
        """Start the background fill of a reader made with fill_later (until then each read fetches what it
        needs). Once is enough; a reader without a fill, or closed, ignores it."""
        with self._lock:  # under the lock: close() joins the filler only once it was started
            if self._filler is None or self._fill_started or self._closed:
                return
            self._fill_started = True
            self._filler.start()

    def _where(self, u: _Unit) -> str:
        return f"{self._what}, file {u.path} offset {u.offset} (deferred)"

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
        k = max(0, bisect.bisect_right(f.piece_starts, offset) - 1)
        while k < len(f.pieces) and f.pieces[k].start < end:
            p = f.pieces[k]
            if p.start + p.length > offset:
                self._ensure(p.unit)
            k += 1
        data = os.pread(f.fd, length, offset)
        if len(data) != length:
            raise StoreError(f"{path!r:.200}: {len(data)} bytes at {offset}, {length} expected (file changed?)")
        with self._lock:
            self._reads += 1
            self._served += length
            self._read_ns += time.monotonic_ns() - started
        return data

    def wait_filled(self, timeout: float | None = None) -> bool:
        """Whether the background fill has written every deferred byte (or given up on a unit); a reader
        without a fill never has."""
        if self._filler is None or not self._fill_started:
            return False
        self._filler.join(timeout)
        return not self._filler.is_alive()

    # -- the fill ------------------------------------------------------------------------------------
    def _ensure(self, unit: int) -> None:
        """Return once the unit's bytes are in the file: claimed here if nobody has, else waited for."""
        with self._lock:
            fill = self._fills[unit]
            if fill is None:
                fill = self._fills[unit] = _Fill()
            mine = not fill.started  # unclaimed, or queued for the fill but not begun: fetched here, now
            if mine:
                fill.started = True
                self._by_read += 1
        if mine:
            self._write_unit(unit, fill, alone=True)
        else:
            fill.done.wait()
        if fill.error is not None:
            raise fill.error

    def _fill_all(self) -> None:
        """Claim the units in file order and fetch them on the pool, within the memory bound."""
        try:
            for unit, u in enumerate(self._units):
                with self._lock:
                    while not self._closed and (
                        self._queued >= self._depth or (self._inflight and self._inflight + u.clen > self.memory_limit)
                    ):
                        self._room.wait()
                    if self._closed:
                        return
                    if self._fills[unit] is not None:
                        continue  # a read got there first
                    fill = self._fills[unit] = _Fill()
                    if u.digest == ZERO:
                        fill.started = True
                        fill.done.set()  # a hole reads as zeros already
                        continue
                    self._queued += 1
                    self._inflight += u.clen  # reserved while queued: the bound counts it from here
                    self._peak = max(self._peak, self._inflight)
                self._pool.submit(self._fill_one, unit, fill)
            self._pool.shutdown(wait=True)
            self._filled_at = time.monotonic()
            log.info("lazy restore: every deferred byte written: %s", self.stats())
        except RuntimeError:  # the pool was shut down by close()
            return

    def _fill_one(self, unit: int, fill: _Fill) -> None:
        clen = self._units[unit].clen
        with self._lock:
            self._queued -= 1
            stolen = fill.started  # a read took it while it waited in the queue
            if stolen:
                self._inflight -= clen
            else:
                fill.started = True
                self._by_fill += 1
            self._room.notify_all()
        if stolen:
            return
        try:
            self._write_unit(unit, fill)
        except BaseException as e:  # kept in the unit: the read that needs it raises it
            log.warning("lazy restore: chunk %s: %s", self._units[unit].digest, e)
        finally:
            with self._lock:
                self._inflight -= clen
                self._room.notify_all()

    def _write_unit(self, unit: int, fill: _Fill, alone: bool = False) -> None:
        """Fetch and verify the unit, pwrite its pieces into the holes; set fill (with the error, if any).
        alone: a read's own fetch, out of the fill's order (only this chunk, not its pack's read window)."""
        u = self._units[unit]
        try:
            if u.digest != ZERO:
                data = self._store._fetch_verified(u.digest, u.clen, self._where(u), self._sealed, self._timings, alone)
                with self._lock:
                    self._fetched += 1
                view = memoryview(data)
                for f, p in self._unit_pieces[unit]:
                    if p.coff + p.length > len(data):  # the manifest check bounds slices; verification the length
                        raise StoreError(f"chunk {u.digest} has no bytes at {p.coff} of {p.length}")
                    _pwrite_all(f.fd, view[p.coff : p.coff + p.length], p.start)
        except BaseException as e:
            fill.error = e
            raise
        finally:
            fill.done.set()

    # -- the end -------------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """What the reader did, for logs: reads, bytes served and fetched, who fetched, memory held."""
        t = self._timings.as_dict()
        with self._lock:
            return {
                "reads": self._reads,
                "bytes_served": self._served,
                "chunks_fetched": self._fetched,
                "bytes_fetched": t["bytes_fetched"],
                "units": len(self._units),
                "claimed_by_fill": self._by_fill,
                "claimed_by_reads": self._by_read,
                "held_bytes": self._inflight,
                "held_peak": self._peak,
                "memory_limit": self.memory_limit,
                "read_wait_ms": round(self._read_ns / 1e6, 1),
                "filled_s": round(self._filled_at - self._started, 3) if self._filled_at else None,
                "wall_ms": round((time.monotonic() - self._started) * 1000, 1),
                **{k: t[k] for k in ("fetch_ms", "open_ms", "decode_ms", "verify_ms")},
            }

    def check_present(self) -> None:
        """Every deferred chunk is in the store's chunk listing (one listing; a backend that cannot list is
        trusted): a missing one is ChunkCorrupt. Damage inside a chunk shows only when it is read."""
        store = self._store
        names = store.backend.retry("list chunks", store._chunk_names)
        if names is None:
            return
        for u in self._units:
            if u.digest != ZERO and u.digest not in names:
                raise ChunkCorrupt(u.digest, "is missing", self._where(u))

    def close(self) -> None:
        """Stop the fill, wait for its fetches, close the files; reads fail from then on."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._room.notify_all()
        self._pool.shutdown(wait=True, cancel_futures=True)
        if self._filler is not None and self._fill_started:
            self._filler.join()
        for fill in self._fills:  # cancelled before they ran: a waiting read must not hang
            if fill is not None and not fill.done.is_set():
                fill.error = StoreError("deferred reader is closed")
                fill.done.set()
        self._close_fds()
        log.info("deferred reader closed: %s", self.stats())

    def _close_fds(self) -> None:
        for f in self._files.values():
            if f.fd >= 0:
                os.close(f.fd)
                f.fd = -1
        if self._root_fd >= 0:
            os.close(self._root_fd)
            self._root_fd = -1

    def __enter__(self) -> DeferredReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _open_below(root_fd: int, path: str) -> int:
    """Open root/path for reading and writing, no component a symlink (the get built the tree: paths were
    checked; this holds against anything that changed it since)."""
    parts = path.split("/")
    fd = root_fd
    try:
        for part in parts[:-1]:
            nxt = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            if fd != root_fd:
                os.close(fd)
            fd = nxt
        return os.open(parts[-1], os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
    finally:
        if fd != root_fd:
            os.close(fd)


def _pwrite_all(fd: int, view: memoryview, pos: int) -> None:
    while view:
        n = os.pwrite(fd, view, pos)
        view, pos = view[n:], pos + n
