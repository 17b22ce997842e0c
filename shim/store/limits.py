"""Bounds on everything the store reads back: a store's contents may be written by someone else.

Every size, count and length taken from a manifest, an index or a server response is checked against
these before memory is allocated or a file is written.
"""

from __future__ import annotations

import threading

import zstandard

# Decoded manifest JSON. At the default chunking (FastCDC, 64 KiB average) a chunk reference takes
# ~90 bytes: 192 MiB holds ~2.2 million references, ~140 GiB of checkpoint data.
MAX_MANIFEST_BYTES = 192 << 20
MAX_ENTRIES = 1_000_000  # files, dirs and symlinks of one checkpoint
MAX_CHUNK_REFS = 4_000_000
MAX_CHUNK_LEN = 64 << 20  # the largest chunk a Chunker produces (FastCDC max = 4 x its 16 MiB cap)
# A stored chunk object: one type byte, then raw data or a zstd frame (a frame never grows incompressible
# data by more than ~0.4%, and the store keeps the raw form then).
# An encrypted store's chunk objects are sealed: at most SEAL_OVERHEAD more (shim.store.crypto adds 37).
SEAL_OVERHEAD = 64
MAX_CHUNK_OBJECT = MAX_CHUNK_LEN + 1 + SEAL_OVERHEAD
MAX_MANIFEST_OBJECT = MAX_MANIFEST_BYTES + (1 << 20)
MAX_LOCK_OBJECT = 64 << 10
# Packs (shim.store.backends.packs): a pack holds at most MAX_PACK_CHUNKS chunks and is sealed once it passes its
# target size (pack_mb, at most MAX_PACK_MB), so one pack is never larger than the target plus one chunk
# plus its trailer. An index object lists the packs of one flush.
MAX_PACK_MB = 256
MAX_PACK_CHUNKS = 1 << 16
MAX_PACK_OBJECT = (MAX_PACK_MB << 20) + MAX_CHUNK_OBJECT + MAX_PACK_CHUNKS * 44 + 64
MAX_INDEX_OBJECT = 256 << 20
# A checkpoint's page table (shim.store.pages): 16 bytes per 4 KiB page of its page images, so 256 MiB
# covers 64 GiB of process memory; the next put holds the whole table (and an index of it) in memory.
MAX_PAGE_TABLE_BYTES = 256 << 20
MAX_FILE_SIZE = 1 << 42  # 4 TiB apparent size (sparse files restore as holes)
MAX_ID = 2**32 - 2  # uid/gid; 2**32 - 1 is "(uid_t) -1", which chown reads as "leave unchanged"
NAME_MAX = 255
PATH_MAX = 4096

_READ_PIECE = 1 << 20


def chunk_object_limit(length: int, sealed: bool = False) -> int:
    """The largest stored object a chunk of `length` bytes may be (type byte + raw data, sealed or not)."""
    return min(length, MAX_CHUNK_LEN) + 1 + (SEAL_OVERHEAD if sealed else 0)


def bounded_zstd_decode(payload: bytes | memoryview, limit: int, window_max: int | None = None) -> bytes:
    """Decode one zstd frame, refusing more than `limit` bytes of output before allocating them.

    `ZstdDecompressor.decompress(max_output_size=)` trusts a frame's declared content size; a forged
    header made an 8 KiB chunk allocate 256 MiB. The header is checked first; a frame that does not
    declare its size is decoded in pieces with a hard cap, and the decoder's window is bounded too.
    Raises zstandard.ZstdError (or ValueError) on anything else.
    """
    params = zstandard.get_frame_parameters(payload)
    if params.content_size != zstandard.CONTENTSIZE_UNKNOWN and params.content_size > limit:
        raise ValueError(f"zstd frame declares {params.content_size} bytes, more than the {limit} expected")
    window = window_max or max(1 << 20, _pow2_at_least(limit))
    if params.window_size > window:
        raise ValueError(f"zstd frame needs a {params.window_size}-byte window, more than {window}")
    dctx = _decompressor(window)
    if params.content_size != zstandard.CONTENTSIZE_UNKNOWN:
        return dctx.decompress(payload, max_output_size=limit)
    pieces: list[bytes] = []
    total = 0
    with dctx.stream_reader(payload) as reader:
        while piece := reader.read(min(_READ_PIECE, limit + 1 - total)):
            total += len(piece)
            if total > limit:
                raise ValueError(f"zstd frame decodes to more than the {limit} bytes expected")
            pieces.append(piece)
            if total == limit and reader.read(1):
                raise ValueError(f"zstd frame decodes to more than the {limit} bytes expected")
            if total == limit:
                break
    return b"".join(pieces)


_tls = threading.local()


def _decompressor(window: int) -> zstandard.ZstdDecompressor:
    # zstandard objects are not thread-safe; one per thread and window bound avoids a context per chunk.
    cache = _tls.__dict__.setdefault("dctx", {})
    d: zstandard.ZstdDecompressor | None = cache.get(window)
    if d is None:
        d = cache[window] = zstandard.ZstdDecompressor(max_window_size=window)
    return d


def _pow2_at_least(n: int) -> int:
    return 1 << max(n - 1, 1).bit_length()
