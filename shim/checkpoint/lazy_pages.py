"""Which pages of a checkpoint a lazy restore leaves to the page server, and where their bytes lie.

A normal CRIU dump marks every pagemap entry of a VMA that userfaultfd can fill later PE_LAZY (and
PE_PRESENT: the bytes are in pages-N.img all the same). `criu restore --lazy-pages` skips those entries
and reads every other entry from the local pages file, so before the restore starts the local
pages-N.img must hold the eager bytes; the lazy ranges may be holes. The page server (page_server.py)
answers the lazy-pages daemon's requests for them, and only for them, from a verified source.

Entries that live in a parent checkpoint (PE_PARENT) have no bytes in this image directory at all, and a
lazy entry without PE_PRESENT (a lazy *dump*) none either: such a checkpoint is not eligible
(NotLazyEligible) and the caller restores it eagerly. Shared-memory pagemaps (pagemap-shmem-N.img) are
always restored eagerly by CRIU, so they contribute no lazy range.
"""

from __future__ import annotations

import bisect
import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path

from .image_check import PAGE_SIZE, PE_LAZY, PE_PARENT, PE_PRESENT, DamagedImage, read_pagemap

TASK_PAGEMAP = re.compile(r"^pagemap-(\d+)\.img$")
# One request may ask for no more than this (16 MiB); CRIU 4.1.1's daemon asks for at most 256 pages (seen).
MAX_REQUEST_PAGES = 4096


class NotLazyEligible(Exception):
    """The checkpoint cannot be restored lazily from its own images; restore it eagerly."""


class BadPageRequest(ValueError):
    """A page request names memory the checkpoint's pagemap does not list as lazy."""


@dataclass(frozen=True)
class LazyExtent:
    vaddr: int
    nr_pages: int
    pages: str  # pages-N.img
    offset: int  # of vaddr's page in that file

    @property
    def end(self) -> int:
        return self.vaddr + self.nr_pages * PAGE_SIZE


@dataclass(frozen=True)
class LazyPlan:
    extents: dict[int, tuple[LazyExtent, ...]]  # pid -> its lazy extents, sorted by vaddr, not overlapping
    _starts: dict[int, list[int]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_starts", {pid: [e.vaddr for e in ext] for pid, ext in self.extents.items()})

    @property
    def ranges(self) -> dict[str, list[tuple[int, int]]]:
        """pages file -> sorted, merged (offset, length) byte ranges that only the page server delivers."""
        spans: dict[str, list[tuple[int, int]]] = {}
        for extents in self.extents.values():
            for e in extents:
                spans.setdefault(e.pages, []).append((e.offset, e.nr_pages * PAGE_SIZE))
        return {name: _merge(sorted(found)) for name, found in spans.items()}

    @property
    def total_pages(self) -> int:
        return sum(e.nr_pages for extents in self.extents.values() for e in extents)

    def eager_ranges(self, name: str, size: int) -> list[tuple[int, int]]:
        """The (offset, length) ranges of pages file `name` (of `size` bytes) the restore reads locally:
        what must be fetched before `criu restore --lazy-pages` starts."""
        out, pos = [], 0
        for offset, length in self.ranges.get(name, []):
            if offset > pos:
                out.append((pos, min(offset, size) - pos))
            pos = max(pos, offset + length)
        if pos < size:
            out.append((pos, size - pos))
        return [(o, n) for o, n in out if n > 0]

    def locate(self, pid: int, vaddr: int, nr_pages: int) -> list[tuple[str, int, int]]:
        """The (pages file, offset, length) pieces holding `nr_pages` pages of `pid` from `vaddr`; every
        page must lie in a lazy extent (adjacent extents may be crossed), else BadPageRequest."""
        starts = self._starts.get(pid)
        if starts is None:
            raise BadPageRequest(f"no lazy pages for pid {pid}")
        if not 0 < nr_pages <= MAX_REQUEST_PAGES or vaddr % PAGE_SIZE or vaddr + nr_pages * PAGE_SIZE > 1 << 64:
            raise BadPageRequest(f"bad request: {nr_pages} pages at {vaddr:#x}")
        extents = self.extents[pid]
        i = bisect.bisect_right(starts, vaddr) - 1
        pieces: list[tuple[str, int, int]] = []
        addr, end = vaddr, vaddr + nr_pages * PAGE_SIZE
        while addr < end:
            if i < 0 or i >= len(extents) or not extents[i].vaddr <= addr < extents[i].end:
                raise BadPageRequest(f"pid {pid}: {addr:#x} is not a lazy page (request {vaddr:#x}+{nr_pages})")
            e = extents[i]
            take = min(end, e.end) - addr
            offset = e.offset + (addr - e.vaddr)
            if pieces and pieces[-1][0] == e.pages and pieces[-1][1] + pieces[-1][2] == offset:
                name, start, length = pieces[-1]
                pieces[-1] = (name, start, length + take)
            else:
                pieces.append((e.pages, offset, take))
            addr += take
            i += 1
        return pieces


def _merge(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for offset, length in spans:
        if out and out[-1][0] + out[-1][1] == offset:
            out[-1] = (out[-1][0], out[-1][1] + length)
        else:
            out.append((offset, length))
    return out


def lazy_plan(image_dir: Path) -> LazyPlan:
    """Read the task pagemaps of `image_dir` (the pages files need not be there yet)."""
    extents: dict[int, tuple[LazyExtent, ...]] = {}
    for path in sorted(image_dir.glob("pagemap-*.img")):
        m = TASK_PAGEMAP.match(path.name)
        pagemap = read_pagemap(path)
        if any(e.flags & PE_PARENT for e in pagemap.entries):
            raise NotLazyEligible(f"{path.name} has pages in a parent checkpoint")
        if m is None:
            continue  # shared memory: restored eagerly from its own pages file
        found = []
        for e in pagemap.entries:
            if not e.flags & PE_LAZY or not e.nr_pages:
                continue
            if not e.flags & PE_PRESENT:
                raise NotLazyEligible(f"{path.name}: lazy pages at {e.vaddr:#x} are not in the image")
            found.append(LazyExtent(e.vaddr, e.nr_pages, pagemap.pages, e.offset))
        found.sort(key=lambda x: x.vaddr)
        for a, b in itertools.pairwise(found):
            if a.end > b.vaddr:
                raise DamagedImage(f"{path.name}: overlapping entries at {b.vaddr:#x}")
        if found:
            extents[int(m[1])] = tuple(found)
    if not extents:
        raise NotLazyEligible(f"{image_dir} has no lazy pages")
    return LazyPlan(extents)


def lazy_ranges(image_dir: Path) -> dict[str, list[tuple[int, int]]]:
    """pages file -> the byte ranges a lazy restore leaves to the page server (NotLazyEligible if none)."""
    return lazy_plan(image_dir).ranges
