"""Cheap sanity checks of a CRIU image directory before `runc restore` is let loose on it.

CRIU 4.1 does not notice every damaged image: with a truncated pages file its restorer spins forever
(seen here), so the shim checks what it can in milliseconds first: the inventory is a CRIU image, and
every pages-N.img holds at least the pages its pagemap lists. The pagemap is read without CRIU's
protos: u32 IMG_COMMON magic, u32 PAGEMAP magic (the inventory has only its own magic), then
u32-length-prefixed protobuf entries (PagemapHead{pages_id=1}, then
PagemapEntry{vaddr=1, nr_pages=2, in_parent=3, flags=4}). The lazy restore (lazy_pages.py) reads the
pagemaps through the same parser.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

IMG_COMMON_MAGIC = 0x54564319
INVENTORY_MAGIC = 0x58313116
PAGEMAP_MAGIC = 0x56084025
PE_PARENT, PE_LAZY, PE_PRESENT = 1, 2, 4
PAGE_SIZE = 4096


class DamagedImage(ValueError):
    """The directory is not a complete CRIU checkpoint; the message says what is wrong."""


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data):
            raise DamagedImage("truncated protobuf varint")
        b = data[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7


def _fields(message: bytes) -> dict[int, int]:
    """The varint fields of a protobuf message (all the pagemap entries have)."""
    out: dict[int, int] = {}
    pos = 0
    while pos < len(message):
        key, pos = _varint(message, pos)
        if key & 7 != 0:
            raise DamagedImage(f"unexpected protobuf wire type {key & 7}")
        out[key >> 3], pos = _varint(message, pos)
    return out


def _entries(path: Path, magics: tuple[int, ...]) -> list[bytes]:
    data = path.read_bytes()
    head = len(magics) * 4
    if len(data) < head or struct.unpack_from(f"<{len(magics)}I", data) != magics:
        raise DamagedImage(f"{path.name} is not a CRIU image of the expected kind")
    entries, pos = [], head
    while pos < len(data):
        if pos + 4 > len(data):
            raise DamagedImage(f"{path.name} is truncated")
        (size,) = struct.unpack_from("<I", data, pos)
        if pos + 4 + size > len(data):
            raise DamagedImage(f"{path.name} is truncated")
        entries.append(data[pos + 4 : pos + 4 + size])
        pos += 4 + size
    return entries


@dataclass(frozen=True)
class PagemapEntry:
    vaddr: int
    nr_pages: int
    flags: int
    offset: int  # where its pages lie in the pages file (meaningful when present and not in a parent)

    @property
    def in_file(self) -> bool:
        return bool(self.flags & PE_PRESENT) and not self.flags & PE_PARENT


@dataclass(frozen=True)
class Pagemap:
    name: str  # pagemap-<pid>.img or pagemap-shmem-<id>.img
    pages: str  # the pages-N.img its entries' data lies in
    entries: tuple[PagemapEntry, ...]

    @property
    def bytes_needed(self) -> int:
        return sum(e.nr_pages for e in self.entries if e.in_file) * PAGE_SIZE


def read_pagemap(path: Path) -> Pagemap:
    """Parse one pagemap image; each present entry gets its offset in the pages file (they follow in order)."""
    raw = _entries(path, (IMG_COMMON_MAGIC, PAGEMAP_MAGIC))
    if not raw:
        raise DamagedImage(f"{path.name} has no header")
    pages_id = _fields(raw[0]).get(1, 0)
    entries, offset = [], 0
    for message in raw[1:]:
        e = _fields(message)
        flags = e.get(4, PE_PARENT if e.get(3) else PE_PRESENT)
        entry = PagemapEntry(vaddr=e.get(1, 0), nr_pages=e.get(2, 0), flags=flags, offset=offset)
        if entry.vaddr % PAGE_SIZE or entry.nr_pages >= 1 << 40 or entry.vaddr + entry.nr_pages * PAGE_SIZE >= 1 << 64:
            raise DamagedImage(f"{path.name}: impossible entry at {entry.vaddr:#x} ({entry.nr_pages} pages)")
        if entry.in_file:
            offset += entry.nr_pages * PAGE_SIZE
        entries.append(entry)
    return Pagemap(name=path.name, pages=f"pages-{pages_id}.img", entries=tuple(entries))


def check_image_dir(image_dir: Path) -> None:
    """Raise DamagedImage when `image_dir` cannot be a complete CRIU checkpoint."""
    inventory = image_dir / "inventory.img"
    if not inventory.is_file():
        raise DamagedImage(f"{image_dir} is not a CRIU checkpoint (no inventory.img)")
    if not _entries(inventory, (INVENTORY_MAGIC,)):  # the inventory alone has no common magic
        raise DamagedImage("inventory.img is empty")
    for path in sorted(image_dir.glob("pagemap-*.img")):
        pagemap = read_pagemap(path)
        pages = image_dir / pagemap.pages
        have = pages.stat().st_size if pages.exists() else 0
        if have < pagemap.bytes_needed:
            raise DamagedImage(f"{pages.name} is truncated: {have} bytes, {path.name} lists {pagemap.bytes_needed}")
