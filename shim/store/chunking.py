"""Cutting files into chunks and encoding chunks for storage.

Chunking was chosen by measurement on real CRIU dumps (bench/RESULTS.md, "## Store"): between two
dumps of one process, pages-N.img shifts by whole pages whenever the process maps or grows memory
before a region, which breaks fixed-offset chunks (98% of the second dump "new" with fixed 64 KiB vs
79% with FastCDC 64 KiB, 36% with FastCDC 16 KiB); when nothing shifts both are close (6.9% vs 8.7%).
FastCDC at a 64 KiB average is the default: robust to shifts, while keeping the number of S3 objects
and registry blobs (one per chunk; the file backend packs them) manageable. `fixed:SIZE` remains
available.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass

import zstandard

CHUNK_RAW = 0
CHUNK_ZSTD = 1
DEFAULT_CHUNK_SIZE = 64 * 1024
DEFAULT_KIND = "fastcdc"
# A chunk is stored compressed only if zstd saves at least this fraction; otherwise raw (fast to restore).
MIN_SAVING = 0.03


@dataclass(frozen=True)
class Chunker:
    kind: str = DEFAULT_KIND  # "fixed" or "fastcdc"
    size: int = DEFAULT_CHUNK_SIZE  # fixed size, or FastCDC average

    def __post_init__(self) -> None:
        if self.kind not in ("fixed", "fastcdc"):
            raise ValueError(f"unknown chunker {self.kind!r}")
        if self.size < 4096 or self.size % 4096:
            raise ValueError("chunk size must be a multiple of 4096 (page aligned)")

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
    if not blob:
        raise ValueError("empty object")
    kind = blob[0]
    if kind == CHUNK_RAW:
        return blob[1:]
    if kind == CHUNK_ZSTD:
        return _decompressor().decompress(blob[1:], max_output_size=expected_len)
    raise ValueError(f"unknown chunk encoding {kind}")


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


def _decompressor() -> zstandard.ZstdDecompressor:
    d = getattr(_tls, "decomp", None)
    if d is None:
        d = _tls.decomp = zstandard.ZstdDecompressor()
    return d
