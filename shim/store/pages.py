"""Page-granular dedup of memory page images (CRIU pages-*.img) between checkpoints of one key.

Content-defined chunks of 64 KiB hold 16 pages: when 5 % of a process's pages change one by one, most
chunks of its page image change, and a second checkpoint re-uploads most of the first. Here each 4 KiB
page is looked up by content (a 16-byte BLAKE3 hash) in the parent checkpoint's page table; pages found
become slice references into the chunks that already hold them, pages not found are packed together into
new chunks. A lookup by content, not position, also matches regions that moved by whole pages.

The page table is the 16-byte hashes of every page of the checkpoint's page-image files, in manifest
order, stored as ordinary chunks (sealed like any chunk on an encrypted store). Where a page's bytes live
is not stored: it follows from the same manifest's references for that file offset.
"""

from __future__ import annotations

import bisect
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

import blake3

from .chunking import Chunker
from .errors import StoreError
from .limits import MAX_CHUNK_LEN, MAX_PAGE_TABLE_BYTES
from .model import PAGE, PAGE_HASH_LEN, ZERO, Manifest, page_count

log = logging.getLogger(__name__)

# Bytes of a page image read (and hashed) at a time; new pages gather until this much is waiting.
WINDOW = 16 << 20
# Referencing a parent may add at most one reference per PAGES_PER_RUN pages of a file (at least
# MIN_EXTRA_RUNS) to what its windows cost without one; a window that would go beyond (pages changed one
# by one all over it) is uploaded as new pages. 5 % of pages changed one by one add about 1 in 10. A
# reference is ~100 bytes of manifest: at most ~17 bytes a page more, 70 MB for 16 GiB of pages.
PAGES_PER_RUN = 6
MIN_EXTRA_RUNS = 64
ZERO_PAGE = bytes(PAGE)
ZERO_PAGE_HASH = blake3.blake3(bytes(PAGE)).digest(PAGE_HASH_LEN)


def page_hashes(buf: bytes | memoryview) -> bytes:
    """The 16-byte BLAKE3 of each 4 KiB page of buf (the last one may be shorter), concatenated."""
    view = memoryview(buf)
    h = blake3.blake3  # blake3 keeps the GIL for 4 KiB inputs: this loop is single-core whatever we do
    return b"".join([h(view[i : i + PAGE]).digest(PAGE_HASH_LEN) for i in range(0, len(view), PAGE)])


@dataclass(frozen=True)
class Location:
    digest: str
    offset: int  # in the chunk's data
    chunk_len: int


class PageIndex:
    """Where each full page of a parent checkpoint lives, by content: chunk digest and offset in it."""

    def __init__(self, parent: Manifest, table: bytes, available: Callable[[str], bool]) -> None:
        """table: the parent's page table (its length checked against the manifest by the caller);
        available: whether a chunk may be referenced (it is listed in the store)."""
        self._files: list[tuple[list[int], list[list[Any]], int]] = []
        self._where: dict[bytes, int] = {}
        self._available = available
        self._last = (-1, 0)
        pos = 0
        spans: list[tuple[int, int, int]] = []  # (table offset, full pages, file index)
        for fi, e in enumerate(parent.page_files()):
            refs = e["chunks"]
            self._files.append(([r[0] for r in refs], refs, e["size"]))
            full = e["size"] // PAGE
            spans.append((pos, full, fi))
            pos += page_count(e["size"]) * PAGE_HASH_LEN
        if pos != len(table):
            raise ValueError(f"page table of {len(table)} bytes for {pos} bytes of hashes")
        # The first page with a given hash wins: filled last to first, so earlier pages overwrite later.
        for start, full, fi in reversed(spans):
            hashes = [table[p : p + PAGE_HASH_LEN] for p in range(start, start + full * PAGE_HASH_LEN, PAGE_HASH_LEN)]
            self._where.update(zip(reversed(hashes), range((fi << 32) + full - 1, (fi << 32) - 1, -1), strict=True))

    def __len__(self) -> int:
        return len(self._where)

    def find(self, h: bytes) -> Location | None:
        g = self._where.get(h)
        if g is None:
            return None
        fi = g >> 32
        starts, refs, _size = self._files[fi]
        off = (g & 0xFFFFFFFF) * PAGE
        last_fi, last_i = self._last
        if last_fi == fi and starts[last_i] <= off < starts[last_i] + refs[last_i][1]:
            i = last_i  # pages found one after the other mostly sit in one reference
        else:
            i = bisect.bisect_right(starts, off) - 1
            if i < 0:
                return None
            self._last = (fi, i)
        r = refs[i]
        if r[2] == ZERO or off + PAGE > r[0] + r[1]:
            return None  # a hole, or a page split across two references: not worth a lookup
        coff, clen = (r[3], r[4]) if len(r) == 5 else (0, r[1])
        if not self._available(r[2]):
            return None
        return Location(r[2], coff + off - r[0], clen)


# Uploads consecutive chunks of one buffer (their lengths given), in one work item: yields their digests.
# One item per batch, not per 64 KiB chunk: per-chunk futures, slots and GIL hand-offs cost the put more
# CPU than hashing the chunks did (bench/put_cpu_bench.py).
Submit = Callable[[bytes | memoryview, Sequence[int]], "Future[list[str]]"]
# A batch: consecutive new chunks up to this many bytes (and at most max_batch chunks).
BATCH_BYTES = 1 << 20


def batch_limit(max_inflight: int) -> int:
    """Chunks per batch where the put holds max_inflight chunks in flight: room for 4 batches at once."""
    return max(1, max_inflight // 4)


class PlannedFile:
    """One page-image file of a put: its manifest entry, planned runs and page hashes so far."""

    def __init__(self, entry: dict[str, Any]) -> None:
        self.entry = entry
        self.runs: list[list[Any]] = []  # [kind, file offset, length, a, b, c]
        self.hashes: list[bytes] = []
        self.end = 0  # bytes added
        self.closed = False
        self.pages = 0  # full pages added
        self.extra_runs = 0  # runs beyond what the file would cost without a parent (PAGES_PER_RUN)


class PagePlanner:
    """Builds the chunk references of the page-image files of one put.

    add_file() reads a file in windows (or start_file() and add_window() take the windows of a file
    still being written), hashes its pages, looks each up in the parent's index and queues
    pages not found for new chunks (submit uploads one chunk's data and yields its digest). Once every
    upload is done, resolve() fills each file's references; table() is this put's page table.
    """

    def __init__(self, index: PageIndex | None, chunker: Chunker, submit: Submit, max_batch: int = 16) -> None:
        """max_batch: the most chunks submitted in one batch (submit may hold a slot per chunk)."""
        self.index = index
        self.chunker = chunker
        self.submit = submit
        self.max_batch = max(1, max_batch)
        self.files: list[PlannedFile] = []
        self._stream = bytearray()  # new pages waiting to be cut into chunks
        self._stream_pos = 0  # stream offset of _stream[0]
        # (stream offset, length, its batch's digests, index in the batch)
        self._chunks: list[tuple[int, int, Future[list[str]], int]] = []
        self.found_bytes = 0
        self.zero_bytes = 0
        self.new_bytes = 0
        self.table_bytes = 0  # of this put's page table so far
        self.fallback_windows = 0  # windows uploaded whole: too finely changed to reference

    def add_file(self, entry: dict[str, Any], fd: int) -> None:
        """A finished file, read whole."""
        size = entry["size"]
        f = self.start_file(entry)
        off = 0
        while off < size:
            buf = os.pread(fd, min(WINDOW, size - off), off)
            if len(buf) != min(WINDOW, size - off):
                raise StoreError(f"short read at {off} of {entry['path']} (file changed during put?)")
            self.add_window(f, buf, off)
            off += len(buf)

    def start_file(self, entry: dict[str, Any]) -> PlannedFile:
        """A file whose windows follow, in order, through add_window (a file still growing may be fed as it
        grows, the same plan results). The page table lists files in the order of self.files."""
        f = PlannedFile(entry)
        self.files.append(f)
        return f

    def add_window(self, f: PlannedFile, buf: bytes | memoryview, off: int) -> None:
        """The next bytes of f, from file offset off: whole pages, except in the file's last window."""
        if off != f.end or f.closed:
            raise StoreError(f"{f.entry['path']}: window at {off}, expected {f.end} (not appended in order)")
        runs = f.runs
        hashes = page_hashes(buf)
        self.table_bytes += len(hashes)
        f.hashes.append(hashes)
        view = memoryview(buf)
        full = len(buf) // PAGE
        f.end += len(buf)
        f.closed = full * PAGE < len(buf)  # a short page ends the file
        before = (len(runs), list(runs[-1]) if runs else None, len(self._stream), self.found_bytes, self.new_bytes)
        stretches = self._plan_window(runs, view, hashes, off, full, lookup=self.index is not None)
        extra_runs = len(runs) - before[0] - stretches  # beyond what the window costs without a parent
        allowed = max(MIN_EXTRA_RUNS, (f.pages + full) // PAGES_PER_RUN)  # over the file so far: windows vary
        f.pages += full
        if self.index is not None and f.extra_runs + extra_runs <= allowed:
            f.extra_runs += extra_runs
        elif self.index is not None:
            # Changes scattered so finely that a reference per unchanged stretch would make the manifest
            # larger than the data saved is worth (a 16 GiB job's came to 214 MB, over the manifest
            # limit, and the checkpoint failed): this window's pages go up as new pages instead.
            n_runs, last, stream_len, self.found_bytes, self.new_bytes = before
            del runs[n_runs:]
            if last is not None:
                runs[-1] = last  # a run extended into this window, as it was
            del self._stream[stream_len:]
            self.fallback_windows += 1
            self._plan_window(runs, view, hashes, off, full, lookup=False)
        if f.closed:  # a short last page: its own chunk
            n = len(buf) - full * PAGE
            self._run(runs, "tail", off + full * PAGE, n, self.submit(bytes(view[full * PAGE :]), (n,)), 0, 0)
            self.new_bytes += n
        if len(self._stream) >= WINDOW:
            self._cut(final=False)

    def _plan_window(
        self, runs: list[list[Any]], view: memoryview, hashes: bytes, off: int, full: int, *, lookup: bool
    ) -> int:
        """The window's full pages as runs. Python work per run of pages, not per page: zero pages are
        found by their hash (confirmed by a compare), the pages between them are looked up (or, without
        lookup, queued) as runs of new pages. Returns the number of zero and non-zero stretches: the
        runs the window makes without a parent."""
        zero_bytes = stretches = 0
        start = 0
        for z0, z1 in _zero_runs(hashes, view, full):
            if z0 > start:
                self._add_pages(runs, view, hashes, off, start, z0, lookup)
                stretches += 1
            self._run(runs, "zero", off + z0 * PAGE, (z1 - z0) * PAGE, None, 0, 0)
            zero_bytes += (z1 - z0) * PAGE
            stretches += 1
            start = z1
        if full > start:
            self._add_pages(runs, view, hashes, off, start, full, lookup)
            stretches += 1
        if lookup or self.index is None:  # a fallback's second pass counted these already
            self.zero_bytes += zero_bytes
        return stretches

    def _add_pages(
        self, runs: list[list[Any]], view: memoryview, hashes: bytes, off: int, a: int, b: int, lookup: bool = True
    ) -> None:
        """Pages a..b-1 of the window at file offset off, none of them zero: slices where the parent
        has them, new pages otherwise (consecutive new pages join the stream as one run)."""
        if self.index is None or not lookup:
            self._add_new(runs, view, off, a, b)
            return
        find = self.index.find
        new_from = -1
        for i in range(a, b):
            loc = find(hashes[i * PAGE_HASH_LEN : (i + 1) * PAGE_HASH_LEN])
            if loc is None:
                if new_from < 0:
                    new_from = i
                continue
            if new_from >= 0:
                self._add_new(runs, view, off, new_from, i)
                new_from = -1
            self._run(runs, "slice", off + i * PAGE, PAGE, loc.digest, loc.offset, loc.chunk_len)
            self.found_bytes += PAGE
        if new_from >= 0:
            self._add_new(runs, view, off, new_from, b)

    def _add_new(self, runs: list[list[Any]], view: memoryview, off: int, a: int, b: int) -> None:
        n = (b - a) * PAGE
        self._run(runs, "new", off + a * PAGE, n, None, self._stream_pos + len(self._stream), 0)
        self._stream += view[a * PAGE : b * PAGE]
        self.new_bytes += n

    @staticmethod
    def _run(runs: list[list[Any]], kind: str, off: int, n: int, a: Any, b: int, c: int) -> None:
        """Append a page to the runs, extending the last run where the page continues it."""
        if runs:
            last = runs[-1]
            if last[0] == kind and last[1] + last[2] == off and kind != "tail":
                if kind == "zero" or (kind == "new" and last[4] + last[2] == b):
                    last[2] += n
                    return
                if kind == "slice" and last[3] == a and last[4] + last[2] == b and last[5] == c:
                    last[2] += n
                    return
        runs.append([kind, off, n, a, b, c])

    def _cut(self, final: bool) -> None:
        """Cut the waiting new pages into page-aligned content-defined chunks and submit them; unless
        final, the last chunk stays (it may grow with the next pages)."""
        # The batches are views of this buffer, never changed again (no copy per batch): the pages not cut
        # yet move to a fresh buffer, and this one is freed once its last batch is stored.
        buf = memoryview(self._stream).toreadonly()
        ends = list(_page_cuts(self.chunker, buf))
        if not final and ends and ends[-1] == len(buf):
            ends.pop()
        start = 0
        i = 0
        while i < len(ends):
            j = i + 1  # consecutive chunks up to BATCH_BYTES (a chunk is at most MAX_CHUNK_LEN) and max_batch
            while j < len(ends) and j - i < self.max_batch and ends[j] - start <= BATCH_BYTES:
                j += 1
            lengths = [e - s for s, e in zip([start, *ends[i : j - 1]], ends[i:j], strict=True)]
            fut = self.submit(buf[start : ends[j - 1]], lengths)
            pos = self._stream_pos + start
            for k, n in enumerate(lengths):
                self._chunks.append((pos, n, fut, k))
                pos += n
            start = ends[j - 1]
            i = j
        if start:
            self._stream = bytearray(buf[start:])
            self._stream_pos += start

    def finish(self) -> None:
        """Submit the last new pages; call once after the last add_file()."""
        if self._stream:
            self._cut(final=True)

    def resolve(self) -> None:
        """Fill each file's references from its runs; every submitted upload must be done."""
        starts = [c[0] for c in self._chunks]
        for f in self.files:
            refs: list[list[Any]] = []
            for kind, off, n, a, b, c in f.runs:
                if kind == "zero":  # a reference covers at most MAX_CHUNK_LEN (the manifest check's bound)
                    refs.extend([o, min(MAX_CHUNK_LEN, off + n - o), ZERO] for o in range(off, off + n, MAX_CHUNK_LEN))
                elif kind == "tail":
                    refs.append([off, n, a.result()[0]])
                elif kind == "slice":
                    refs.append(_ref(off, n, a, b, c))
                else:
                    refs.extend(self._new_refs(starts, off, n, b))
            f.entry["chunks"] = refs

    def _new_refs(self, starts: list[int], off: int, n: int, pos: int) -> Iterator[list[Any]]:
        while n:
            i = bisect.bisect_right(starts, pos) - 1
            cstart, clen, fut, k = self._chunks[i]
            take = min(n, cstart + clen - pos)
            digest = fut.result()[k]
            yield [off, take, ZERO] if digest == ZERO else _ref(off, take, digest, pos - cstart, clen)
            off, n, pos = off + take, n - take, pos + take

    def table(self) -> bytes:
        return b"".join(h for f in self.files for h in f.hashes)

    def order(self, paths: Sequence[str]) -> None:
        """Put the files in the order of paths (a manifest's): its page table must follow that order."""
        rank = {p: i for i, p in enumerate(paths)}
        self.files.sort(key=lambda f: rank[f.entry["path"]])


def _zero_runs(hashes: bytes, view: memoryview, full: int) -> Iterator[tuple[int, int]]:
    """[first, end) page indices of the runs of zero pages among the first `full` pages of view: found by
    searching the hashes (C speed) for the zero page's, each confirmed against the data."""
    pos = hashes.find(ZERO_PAGE_HASH)
    start = end = -1
    while 0 <= pos < full * PAGE_HASH_LEN:
        if pos % PAGE_HASH_LEN:  # a match straddling two hashes
            pos = hashes.find(ZERO_PAGE_HASH, pos + 1)
            continue
        i = pos // PAGE_HASH_LEN
        if view[i * PAGE : (i + 1) * PAGE] == ZERO_PAGE:
            if i != end:
                if end > start:
                    yield start, end
                start = i
            end = i + 1
        pos = hashes.find(ZERO_PAGE_HASH, pos + PAGE_HASH_LEN)
    if end > start:
        yield start, end


def _ref(off: int, n: int, digest: str, coff: int, clen: int) -> list[Any]:
    """A whole chunk as a plain reference, part of one as a slice."""
    return [off, n, digest] if coff == 0 and n == clen else [off, n, digest, coff, clen]


def _page_cuts(chunker: Chunker, buf: memoryview) -> Iterator[int]:
    """Ends of content-defined chunks of buf (a whole number of pages), moved up to page boundaries."""
    last = 0
    for off, length in chunker.cuts(buf):
        end = -(-(off + length) // PAGE) * PAGE
        if end - last > MAX_CHUNK_LEN:
            end = last + MAX_CHUNK_LEN
        if end > last:
            yield end
            last = end
    if last < len(buf):
        yield len(buf)


def usable_patterns(entries: list[dict[str, Any]], patterns: Sequence[str], key: str) -> Sequence[str]:
    """patterns, or none where the page table of the files they match would exceed its bound."""
    if not patterns:
        return ()
    npages = sum(page_count(e["size"]) for e in entries if e["type"] == "file" and matches(e["path"], patterns))
    if npages * PAGE_HASH_LEN > MAX_PAGE_TABLE_BYTES:
        log.warning("put %r: %d pages of page images, more than one page table covers: FastCDC only", key, npages)
        return ()
    return patterns


def matches(path: str, patterns: Sequence[str]) -> bool:
    """Whether a checkpoint file (relative path) is a page image by the put's patterns."""
    return any(fnmatchcase(path, p) for p in patterns)
