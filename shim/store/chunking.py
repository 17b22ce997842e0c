"""Cutting files into chunks and encoding chunks for storage.

Chunking was chosen by measurement on real CRIU dumps (bench/RESULTS.md, "## Store"): between two
dumps of one process, pages-N.img shifts by whole pages whenever the process maps or grows memory
before a region, which breaks fixed-offset chunks (98% of the second dump "new" with fixed 64 KiB vs
79% with FastCDC 64 KiB, 36% with FastCDC 16 KiB); when nothing shifts both are close (6.9% vs 8.7%).
FastCDC at a 64 KiB average is the default: robust to shifts, while keeping the number of S3 objects
and registry blobs (one per chunk; the file backend packs them) manageable. `fixed:SIZE` remains
available. Page images named to put (CRIU's pages-*.img) are deduplicated page by page on top of this
(shim/store/pages.py); their new pages are cut by this chunker, moved to page boundaries.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass

import zstandard

from shim import errors

from .errors import StoreError
from .limits import MAX_CHUNK_LEN, bounded_zstd_decode

CHUNK_RAW = 0
CHUNK_ZSTD = 1
DEFAULT_CHUNK_SIZE = 64 * 1024
DEFAULT_KIND = "fastcdc"
# The new pages of page images are deduplicated page by page (shim/store/pages.py), not by these chunks,
# so their chunks can be larger: each chunk costs the put and the get per-chunk Python work (hashing,
# encoding, pack entries, futures). 256 KiB against 64 KiB on a real 1 GiB dump: put CPU -20-23 %, get
# wall -51-68 % (bench/RESULTS.md, "Larger chunks for new pages"); a lazy restore's fault fetches one chunk.
DEFAULT_PAGE_CHUNK_SIZE = 256 * 1024
# A chunk is stored compressed only if zstd saves at least this fraction; otherwise raw (fast to restore).
MIN_SAVING = 0.03
# Chunker sizes: a fixed chunk or a FastCDC maximum (4 x the average) stays within MAX_CHUNK_LEN.
MAX_CHUNKER_SIZE = MAX_CHUNK_LEN // 4


class ChunkDecodeError(StoreError, errors.DataLoss):
    """A stored chunk object that is not a valid encoding of a chunk of the expected length."""


@dataclass(frozen=True)
class Chunker:
    kind: str = DEFAULT_KIND  # "fixed" or "fastcdc"
    size: int = DEFAULT_CHUNK_SIZE  # fixed size, or FastCDC average

    def __post_init__(self) -> None:
        if self.kind not in ("fixed", "fastcdc"):
            raise ValueError(f"unknown chunker {self.kind!r}")
        if self.size < 4096 or self.size % 4096:
            raise ValueError("chunk size must be a multiple of 4096 (page aligned)")
        if self.size > MAX_CHUNKER_SIZE:
            raise ValueError(f"chunk size must be at most {MAX_CHUNKER_SIZE} bytes")

    def cuts(self, buf: memoryview) -> Iterator[tuple[int, int]]:
        """(offset, length) pairs covering buf."""
        if self.kind == "fixed":
            for off in range(0, len(buf), self.size):
                yield off, min(self.size, len(buf) - off)
        else:
            from pyfastcdc import FastCDC

            cdc = FastCDC(avg_size=self.size, min_size=self.size // 4, max_size=self.size * 4)
            for c in cdc.cut_buf(buf):
                yield c.offset, c.length

    @classmethod
    def for_pages(cls) -> Chunker:
        """The default chunker of page images' new pages."""
        return cls(DEFAULT_KIND, DEFAULT_PAGE_CHUNK_SIZE)

    def describe(self) -> str:
        return f"{self.kind}:{self.size}"

    @classmethod
    def parse(cls, spec: str) -> Chunker:
        kind, _, size = spec.partition(":")
        return cls(kind or DEFAULT_KIND, int(size) if size else DEFAULT_CHUNK_SIZE)


def encode_chunk(data: bytes | memoryview, level: int = 1) -> bytes:
    """One type byte then the payload: zstd when it saves space, raw otherwise."""
    comp = _compressor(level).compress(data)
    if len(comp) <= len(data) * (1 - MIN_SAVING):
        return bytes([CHUNK_ZSTD]) + comp
    return bytes([CHUNK_RAW]) + bytes(data)


def decode_chunk(blob: bytes, expected_len: int) -> bytes:
    """The chunk's data, never more than expected_len bytes decoded (nor allocated): ChunkDecodeError else."""
    if not blob:
        raise ChunkDecodeError("empty object")
    kind = blob[0]
    if kind == CHUNK_RAW:
        if len(blob) - 1 != expected_len:
            raise ChunkDecodeError(f"raw chunk of {len(blob) - 1} bytes, expected {expected_len}")
        return blob[1:]
    if kind == CHUNK_ZSTD:
        try:
            data = bounded_zstd_decode(memoryview(blob)[1:], expected_len)
        except (zstandard.ZstdError, ValueError) as e:
            raise ChunkDecodeError(f"zstd: {e}") from None
        if len(data) != expected_len:
            raise ChunkDecodeError(f"decodes to {len(data)} bytes, expected {expected_len}")
        return data
    raise ChunkDecodeError(f"unknown chunk encoding {kind}")


def is_zero(data: bytes | memoryview) -> bool:
    # startswith on a shared zero buffer is one memcmp, with no allocation and no per-length cache
    # (chunk lengths vary under FastCDC; caching a buffer per length grew without bound).
    if len(data) <= len(_ZEROS):
        return _ZEROS.startswith(data)
    return data == bytes(len(data))


_ZEROS = bytes(4 << 20)


_tls = threading.local()


def _compressor(level: int) -> zstandard.ZstdCompressor:
    # zstandard objects are not thread-safe; one per thread avoids re-creating contexts per chunk.
    comps: dict[int, zstandard.ZstdCompressor] = _tls.__dict__.setdefault("comps", {})
    c = comps.get(level)
    if c is None:
        c = comps[level] = zstandard.ZstdCompressor(level=level)
    return c
