"""Packs above a dumb object store: many chunk blobs per remote object (the remote stores' chunk layer).

A remote store pays a request per object; at one object per 64 KiB chunk the request rate, not the
bandwidth, bounds a put. PackStore appends chunk blobs (already compressed, and sealed when the store is
encrypted) to pack objects of a target size and uploads full packs in the background while the put goes
on (at most `uploads` packs in flight, so memory stays near (uploads + 1) x pack size).

Layout under the backend's prefix:
  packs/<id[:2]>/<id>   chunk blobs back to back, then a trailer: one (digest, offset, length) entry per
                        chunk, then a footer (entry count, format version, magic). A pack describes itself:
                        a lost or damaged index is rebuilt from pack trailers (two ranged GETs a pack).
  index/<id>            one per flush: the packs it uploaded and their entries, so readers list and read
                        the indexes instead of every pack.

Durability: a pack is PUT whole (one request, or a multipart upload completed at once); its index is
written after every pack it names is stored; flush_chunks, which the Store calls before a manifest, returns
only when both are. put_manifest refuses a manifest naming a chunk this process does not know to be in an
indexed pack (or a loose object), so a pack upload that failed in the background can never be referenced.

Readers: the index set is rebuilt from one listing of index/ and then one of packs/ (in that order: a pack
is stored before any index names it, so every pack a listed index names is either listed or deleted). An
index entry for a pack no longer listed is dropped; a listed pack no index covers (a writer killed between
its pack and its index, or an index lost) is adopted: its trailer is read and a new index written for it.
Chunks stored one object each (chunks/<d[:2]>/<digest>, stores written before packs) stay readable and
deletable: a chunk not in any pack index is looked up as an object.

gc: delete_chunk marks packed chunks dead; finish_gc deletes packs with no live chunk and rewrites packs
whose dead share reaches REPACK_SHARE (live chunks into new packs, durable with their index, before the old
pack goes), asking proceed() before each removal; then indexes naming removed packs are replaced. Until a
pack is removed, its dead chunks stay readable, so stopping anywhere loses nothing.

Everything read back (index objects, trailers) is bounded and checked (shim.store.limits); a chunk's bytes
are verified against its digest by the Store.
"""

from __future__ import annotations

import functools
import itertools
import logging
import re
import secrets
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol, TypeVar

from ...faults import crash_point
from ..errors import StoreError
from ..limits import MAX_CHUNK_OBJECT, MAX_INDEX_OBJECT, MAX_PACK_CHUNKS, MAX_PACK_MB, MAX_PACK_OBJECT
from .base import Damaged, NotFound

log = logging.getLogger(__name__)
T = TypeVar("T")

ENTRY = struct.Struct("<32sQI")  # digest, offset, length
FOOTER = struct.Struct("<II8s")  # entry count, format version, magic
PACK_MAGIC = b"RVNTPACK"
INDEX_MAGIC = b"RVNTIDX1"
INDEX_HEAD = struct.Struct("<8sI")  # magic, pack count
INDEX_PACK = struct.Struct("<16sI")  # pack id, entry count
VERSION = 1
DEFAULT_PACK_MB = 16
REPACK_SHARE = 0.3  # rewrite a pack once this share of its bytes is dead
TAIL_READ = 64 << 10  # first guess at a trailer's size: one ranged GET covers ~1,500 entries
READ_WINDOW = 8 << 20  # a reader fetches packs in pieces this large (ranged GETs) ...
CACHED_WINDOWS = 6  # ... and keeps this many: 48 MiB
READ_AHEAD = 3  # windows of a planned read fetched ahead of the one the workers are on

_ID = re.compile(r"[0-9a-f]{32}")

Entry = tuple[str, int, int]  # digest, offset, length


class ObjectStore(Protocol):
    """The plain object operations a backend gives the pack layer (names are relative to its prefix)."""

    url: str

    def retry(self, what: str, fn: Callable[[], T]) -> T: ...
    def put_object(self, name: str, data: bytes | bytearray) -> None: ...
    def get_object(self, name: str, limit: int) -> bytes:
        """NotFound when absent, TooLarge when over limit."""
        ...

    def get_range(self, name: str, offset: int, length: int) -> bytes:
        """Exactly length bytes at offset; NotFound when absent, Damaged when the object is shorter."""
        ...

    def object_exists(self, name: str) -> bool: ...

    def list_objects(self, sub: str) -> Iterator[tuple[str, int, float]]:
        """(name, size, last-modified unix time) of every object whose name starts with sub."""
        ...

    def delete_object(self, name: str) -> None: ...


def pack_mb(query: dict[str, str]) -> int:
    """The pack target size from a URL's `pack_mb=` (bounded: a typo must not mean 1 TiB buffers)."""
    raw = query.get("pack_mb", str(DEFAULT_PACK_MB))
    try:
        mb = int(raw)
    except ValueError:
        raise StoreError(f"pack_mb must be a whole number of MiB, got {raw!r}") from None
    if not 1 <= mb <= MAX_PACK_MB:
        raise StoreError(f"pack_mb must be between 1 and {MAX_PACK_MB}, got {mb}")
    return mb


def packs_enabled(query: dict[str, str]) -> bool:
    return query.get("packs", "1") not in ("0", "false", "no")


def pack_name(pack: str) -> str:
    return f"packs/{pack[:2]}/{pack}"


def loose_name(digest: str) -> str:
    return f"chunks/{digest[:2]}/{digest}"


# ---------------------------------------------------------------------- formats
def encode_trailer(entries: list[Entry]) -> bytes:
    body = b"".join(ENTRY.pack(bytes.fromhex(d), o, n) for d, o, n in entries)
    return body + FOOTER.pack(len(entries), VERSION, PACK_MAGIC)


def trailer_size(footer: bytes, pack_size: int, what: str) -> int:
    """The whole trailer's size from a pack's last FOOTER.size bytes, checked against the pack's size."""
    if len(footer) != FOOTER.size:
        raise Damaged(f"{what}: too short for a pack ({pack_size} bytes)")
    count, version, magic = FOOTER.unpack(footer)
    if magic != PACK_MAGIC:
        raise Damaged(f"{what}: no pack trailer (bad magic)")
    if version != VERSION:
        raise Damaged(f"{what}: pack format version {version}, this revenant reads {VERSION}")
    if count > MAX_PACK_CHUNKS:
        raise Damaged(f"{what}: trailer claims {count} chunks, more than the {MAX_PACK_CHUNKS} a pack holds")
    size = int(count) * ENTRY.size + FOOTER.size
    if size > pack_size:
        raise Damaged(f"{what}: trailer of {count} entries is larger than the pack ({pack_size} bytes)")
    return size


def decode_trailer(trailer: bytes, pack_size: int, what: str) -> list[Entry]:
    """The entries of a pack's trailer (its last bytes), each checked to lie inside the pack's data."""
    size = trailer_size(trailer[-FOOTER.size :], pack_size, what)
    if len(trailer) < size:
        raise Damaged(f"{what}: trailer cut short")
    data_end = pack_size - size
    body = trailer[len(trailer) - size : len(trailer) - FOOTER.size]
    out = [(d.hex(), o, n) for d, o, n in ENTRY.iter_unpack(body)]
    for d, o, n in out:
        if n == 0 or n > MAX_CHUNK_OBJECT or o + n > data_end:
            where = f"offset {o}, length {n}"
            raise Damaged(f"{what}: trailer entry {d[:16]} at {where} lies outside its {data_end} data bytes")
    return out


def encode_index(packs: list[tuple[str, list[Entry]]]) -> bytes:
    parts = [INDEX_HEAD.pack(INDEX_MAGIC, len(packs))]
    for pack, entries in packs:
        parts.append(INDEX_PACK.pack(bytes.fromhex(pack), len(entries)))
        parts += [ENTRY.pack(bytes.fromhex(d), o, n) for d, o, n in entries]
    return b"".join(parts)


def decode_index(raw: bytes, what: str) -> dict[str, list[Entry]]:
    """pack id -> entries; every count, offset and length bounded (the object may be anyone's)."""
    if len(raw) < INDEX_HEAD.size:
        raise Damaged(f"{what}: too short for an index")
    magic, npacks = INDEX_HEAD.unpack_from(raw)
    if magic != INDEX_MAGIC:
        raise Damaged(f"{what}: not a pack index (bad magic)")
    pos = INDEX_HEAD.size
    out: dict[str, list[Entry]] = {}
    for _ in range(npacks):
        if pos + INDEX_PACK.size > len(raw):
            raise Damaged(f"{what}: cut short")
        pack, count = INDEX_PACK.unpack_from(raw, pos)
        pos += INDEX_PACK.size
        if count > MAX_PACK_CHUNKS or pos + count * ENTRY.size > len(raw):
            raise Damaged(f"{what}: pack {pack.hex()} claims {count} entries")
        entries = [(d.hex(), o, n) for d, o, n in ENTRY.iter_unpack(raw[pos : pos + count * ENTRY.size])]
        pos += count * ENTRY.size
        for d, o, n in entries:
            if n == 0 or n > MAX_CHUNK_OBJECT or o + n > MAX_PACK_OBJECT:
                raise Damaged(f"{what}: entry {d[:16]} at offset {o}, length {n} cannot be in a pack")
        out[pack.hex()] = entries
    if pos != len(raw):
        raise Damaged(f"{what}: {len(raw) - pos} bytes after its last pack")
    return out


def read_trailer(objects: ObjectStore, pack: str, size: int, what: str) -> list[Entry]:
    """A stored pack's entries from its trailer: one ranged GET of its tail, a second if the trailer is
    larger than TAIL_READ; every entry checked to lie inside the pack's data."""
    if size < FOOTER.size:
        raise Damaged(f"{what}: too short for a pack ({size} bytes)")
    first = min(size, TAIL_READ)
    tail = objects.retry(f"read {what}", lambda: objects.get_range(pack_name(pack), size - first, first))
    need = trailer_size(tail[-FOOTER.size :], size, what)
    if need > len(tail):
        tail = objects.retry(f"read {what}", lambda: objects.get_range(pack_name(pack), size - need, need))
    return decode_trailer(tail, size, what)


# ---------------------------------------------------------------------- writing
class PackWriter:
    """Appends chunk blobs to packs, uploads full ones in the background, indexes them on flush()."""

    def __init__(self, objects: ObjectStore, target: int, uploads: int = 2, index: bool = True) -> None:
        self.objects = objects
        self.target = target
        # index=False: flush() writes no index/ object (a registry keeps one pack index per checkpoint
        # instead, shim.store.backends.ocipacks) and returns "" as each pack's index name.
        self.index = index
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._buf = bytearray()
        self._entries: list[Entry] = []
        self._slots = threading.BoundedSemaphore(uploads)
        self._pool = ThreadPoolExecutor(uploads, thread_name_prefix="revenant-pack")
        self._inflight: set[Future[None]] = set()
        self._done: list[tuple[str, list[Entry]]] = []  # stored, not indexed yet
        self._errors: list[BaseException] = []
        # Raised failures end a generation: uploads of older ones that fail later belong to a put that
        # already failed and must not fail the next one (put_manifest's check covers any other put).
        self._gen = 0
        self.uploading: set[str] = set()  # pack ids stored or in flight, not indexed yet

    def add(self, digest: str, blob: bytes) -> None:
        """Append one chunk blob; raises the failure of an earlier background upload (that put is lost)."""
        with self._lock:
            if self._errors:
                raise self._take_error()
            self._entries.append((digest, len(self._buf), len(blob)))
            self._buf += blob
            crash_point("store.pack.after-append")
            full = len(self._buf) >= self.target or len(self._entries) >= MAX_PACK_CHUNKS
            sealed = self._seal() if full else None
        if sealed:
            self._submit(*sealed)

    def _take_error(self) -> BaseException:
        """The first failure of this generation, which ends it (caller holds _lock)."""
        err = self._errors[0]
        self._errors.clear()
        self._gen += 1
        return err

    def _seal(self) -> tuple[str, bytearray, list[Entry], int]:
        """Take the current pack (caller holds _lock) with its trailer appended."""
        pack = secrets.token_hex(16)
        body, entries = self._buf, self._entries
        body += encode_trailer(entries)
        self._buf, self._entries = bytearray(), []
        self.uploading.add(pack)
        return pack, body, entries, self._gen

    def _submit(self, pack: str, body: bytearray, entries: list[Entry], gen: int) -> None:
        self._slots.acquire()  # bounded memory: wait while `uploads` packs are in flight
        try:
            fut = self._pool.submit(self._upload, pack, body, entries, gen)
        except BaseException:
            self._slots.release()
            raise
        with self._lock:
            self._inflight.add(fut)
        fut.add_done_callback(self._forget)

    def _forget(self, fut: Future[None]) -> None:
        with self._lock:
            self._inflight.discard(fut)

    def _upload(self, pack: str, body: bytearray, entries: list[Entry], gen: int) -> None:
        try:
            self.objects.retry(f"upload pack {pack}", lambda: self.objects.put_object(pack_name(pack), body))
            crash_point("store.pack.after-upload")
            with self._lock:
                self._done.append((pack, entries))
        except BaseException as e:
            with self._lock:
                if gen == self._gen:
                    self._errors.append(e)
                self.uploading.discard(pack)
        finally:
            self._slots.release()

    def flush(self) -> list[tuple[str, str, list[Entry]]]:
        """Store every pack added so far and one index naming them; (index, pack, entries) of each.

        Raises the first failed upload (those chunks are gone; a retry of the put uploads them again)."""
        with self._flush_lock:
            with self._lock:
                sealed = self._seal() if self._entries else None
            if sealed:
                self._submit(*sealed)
            while True:
                with self._lock:
                    pending = list(self._inflight)
                if not pending:
                    break
                for fut in pending:
                    fut.exception()  # waits; _upload records its own failure
            with self._lock:
                if self._errors:
                    raise self._take_error()
                done = list(self._done)
            if not done:
                return []
            index = ""
            if self.index:
                index = f"index/{secrets.token_hex(16)}"
                crash_point("store.index.before-upload")
                self.objects.put_object(index, encode_index(done))  # the Store retries flush_chunks as a whole
                crash_point("store.index.after-upload")
            with self._lock:
                del self._done[: len(done)]
                for pack, _entries in done:
                    self.uploading.discard(pack)
            return [(index, pack, entries) for pack, entries in done]

    def abandon(self) -> None:
        """Drop what is not flushed (a failed put's chunks): nothing indexes it, gc collects stored packs."""
        with self._lock:
            self._buf, self._entries = bytearray(), []

    def close(self) -> None:
        self._pool.shutdown(wait=True)


# ---------------------------------------------------------------------- reading
Window = tuple[str, int]  # pack id, window number
Span = tuple[int, int]  # [start, end) offsets in a pack


class _Windows:
    """Ranged reads of packs in READ_WINDOW pieces, the last CACHED_WINDOWS kept.

    A restore asks for a pack's chunks in about the order they were written, from several threads: one
    GET per window instead of one per chunk (a ranged GET per 64 KiB chunk made SeaweedFS reads slower
    than one object per chunk). Threads asking for a window being fetched wait for that one GET.

    Without a plan every worker waits for the same window, so the GETs never overlap. A reader that
    knows its order (plan()) has the next READ_AHEAD windows it will need fetched in the background
    while the workers decode the current one: each planned window once, and only the span of it that
    planned chunks cover (a restore of an incremental checkpoint reads a few chunks of many packs)."""

    def __init__(self, objects: ObjectStore) -> None:
        self.objects = objects
        self._lock = threading.Lock()
        self._cache: OrderedDict[Window, Future[tuple[int, bytes]]] = OrderedDict()
        self._next: dict[Window, Window] = {}  # planned order: window -> the one needed after it
        self._spans: dict[Window, Span] = {}  # planned window -> the part of it planned chunks need
        self._fetched: set[Window] = set()  # planned windows fetched (or being fetched) already
        self._reached: set[Window] = set()  # planned windows a reader asked for: read-ahead started
        self._pending: set[Window] = set()  # fetched ahead, not asked for yet (at most READ_AHEAD)
        self._sizes: dict[str, int] = {}
        self._ahead: ThreadPoolExecutor | None = None

    def clear(self) -> None:
        with self._lock:
            self._cache.clear()

    def plan(self, windows: list[Window], spans: dict[Window, Span], sizes: dict[str, int]) -> None:
        """The windows a reader is about to ask for, in its order, with the span of each it needs
        (replaces an earlier plan); sizes: pack -> size."""
        with self._lock:
            for w, (lo, hi) in spans.items():
                fut = self._cache.get(w)
                if fut is not None and not _covers(fut, lo, hi):
                    # Fetched for an earlier plan's span (a deferred get plans three times): its chunks
                    # outside that span would each be a ranged GET of their own.
                    del self._cache[w]
            self._next = dict(itertools.pairwise(windows))
            self._spans = spans
            self._fetched, self._reached, self._pending = set(), set(), set()
            self._sizes = sizes

    def close(self) -> None:
        if self._ahead is not None:
            self._ahead.shutdown(wait=True)

    def _claim(self, key: Window) -> tuple[Future[tuple[int, bytes]], bool]:
        """The window's future, and whether the caller must fetch it (caller holds _lock)."""
        fut = self._cache.get(key)
        if fut is not None:
            self._cache.move_to_end(key)
            return fut, False
        fut = self._cache[key] = Future()
        while len(self._cache) > CACHED_WINDOWS:
            self._cache.popitem(last=False)
        return fut, True

    def _fill(self, key: Window, fut: Future[tuple[int, bytes]], pack_size: int) -> None:
        pack, w = key
        start = w * READ_WINDOW
        lo, hi = self._spans.get(key) or (start, min(start + READ_WINDOW, pack_size))
        try:
            fut.set_result((lo, self.objects.get_range(pack_name(pack), lo, hi - lo)))
        except BaseException as e:
            fut.set_exception(e)
            with self._lock:
                if self._cache.get(key) is fut:
                    del self._cache[key]

    def _read_ahead(self, key: Window) -> list[tuple[Window, Future[tuple[int, bytes]], int]]:
        """Claim planned windows after `key` not fetched yet, so that at most READ_AHEAD wait unread:
        more could push windows out of the cache before anyone read them (caller holds _lock)."""
        ahead = []
        nxt: Window | None = key
        for _ in range(2 * READ_AHEAD):
            nxt = self._next.get(nxt) if nxt is not None else None
            if nxt is None or len(self._pending) >= READ_AHEAD:
                break
            size = self._sizes.get(nxt[0], 0)
            if nxt in self._fetched or nxt in self._cache or size <= nxt[1] * READ_WINDOW:
                continue
            self._fetched.add(nxt)
            self._pending.add(nxt)
            ahead.append((nxt, self._claim(nxt)[0], size))
        return ahead

    def cached(self, pack: str, offset: int, length: int) -> bytes | None:
        """The bytes if a fetched window holds them, else None (nothing is fetched or planned)."""
        with self._lock:
            fut = self._cache.get((pack, offset // READ_WINDOW))
        if fut is None or not _covers(fut, offset, offset + length):
            return None
        lo, data = fut.result()
        return data[offset - lo : offset - lo + length]

    def read(self, pack: str, pack_size: int, offset: int, length: int) -> bytes:
        w = offset // READ_WINDOW
        if (offset + length - 1) // READ_WINDOW != w or offset + length > pack_size:
            return self.objects.get_range(pack_name(pack), offset, length)  # straddles, or size unknown
        key = (pack, w)
        ahead: list[tuple[Window, Future[tuple[int, bytes]], int]] = []
        with self._lock:
            fut, owner = self._claim(key)
            if owner:
                self._fetched.add(key)
            if key in self._spans and key not in self._reached:
                self._reached.add(key)
                self._pending.discard(key)
                ahead = self._read_ahead(key)
                if ahead and self._ahead is None:
                    self._ahead = ThreadPoolExecutor(READ_AHEAD, thread_name_prefix="revenant-readahead")
        for nkey, nfut, size in ahead:
            assert self._ahead is not None
            self._ahead.submit(self._fill, nkey, nfut, size)
        if owner:
            self._fill(key, fut, pack_size)
        lo, data = fut.result()
        if offset < lo or offset + length > lo + len(data):  # a chunk the plan did not name
            return self.objects.get_range(pack_name(pack), offset, length)
        return data[offset - lo : offset - lo + length]


def _covers(fut: Future[tuple[int, bytes]], lo: int, hi: int) -> bool:
    """Whether a window's fetch is done and holds [lo, hi) of its pack."""
    if not fut.done() or fut.exception() is not None:
        return False
    start, data = fut.result()
    return start <= lo and hi <= start + len(data)


# ---------------------------------------------------------------------- the chunk layer
@dataclass
class _Loc:
    pack: str
    offset: int
    length: int


class PackStore:
    """The Backend chunk methods (has/put/get/delete/list, flush, finish_gc) on packs of an object store."""

    def __init__(self, objects: ObjectStore, target_mb: int = DEFAULT_PACK_MB, uploads: int = 2) -> None:
        self.objects = objects
        self.url = objects.url
        self.target = target_mb << 20
        self.uploads = uploads
        self.writer = PackWriter(objects, self.target, uploads)
        self._lock = threading.Lock()
        self._index: dict[str, _Loc] = {}
        self._indexes: dict[str, dict[str, list[Entry]]] = {}  # index name -> pack -> entries (as read)
        self._packs: dict[str, tuple[int, float]] = {}  # pack -> (size, mtime), last listing
        self._contents: dict[str, list[Entry]] = {}  # pack -> its entries, from an index that fits it
        self._loose: dict[str, float] = {}  # per-chunk objects (stores written before packs)
        self._bad: set[str] = set()  # listed packs no index covers whose trailer is unreadable
        self._loaded = False
        self._reload_lock = threading.Lock()
        self._reloads = 0  # completed reloads: threads that missed together reload once
        self._doomed: set[str] = set()
        self._windows = _Windows(objects)

    # ------------------------------------------------------------------ index
    def _ensure(self) -> None:
        if not self._loaded:
            self._refresh(0)

    def _refresh(self, seen: int) -> None:
        """Reload unless another thread completed a reload since this one saw `seen` reloads."""
        with self._reload_lock:
            if self._reloads == seen:
                self._reload()

    def reload(self) -> None:
        with self._reload_lock:
            self._reload()

    def _reload(self) -> None:
        """Re-read the index set: indexes first, then packs (see the module docstring for why)."""
        names = set()
        for name, size, _mtime in self.objects.list_objects("index/"):
            if _ID.fullmatch(name[len("index/") :]) is None or size > MAX_INDEX_OBJECT:
                log.warning("%s: skipping stray object %s", self.url, name[:120])
                continue
            names.add(name)
        packs: dict[str, tuple[int, float]] = {}
        for name, size, mtime in self.objects.list_objects("packs/"):
            pack = name.rsplit("/", 1)[-1]
            if _ID.fullmatch(pack) is None or name != pack_name(pack) or size > MAX_PACK_OBJECT:
                log.warning("%s: skipping stray object %s", self.url, name[:120])
                continue
            packs[pack] = (size, mtime)
        indexes = {n: c for n, c in self._indexes.items() if n in names}
        for name in names:
            if name in indexes:
                continue
            try:
                get = functools.partial(self.objects.get_object, name, MAX_INDEX_OBJECT)
                raw = self.objects.retry(f"get {name}", get)
                indexes[name] = decode_index(raw, f"{self.url} {name}")
            except NotFound:
                continue  # replaced by a gc since the listing
            except StoreError as e:  # its packs are adopted from their trailers below
                log.warning("%s: ignoring index %s: %s", self.url, name, e)
        # An index covers a pack only if every entry it lists lies inside the pack (a lying index is
        # no worse than a lost one: the pack is adopted from its own trailer).
        index: dict[str, _Loc] = {}
        contents: dict[str, list[Entry]] = {}
        covered: set[str] = set()
        for iname, content in indexes.items():
            for pack, entries in content.items():
                if pack not in packs:
                    continue  # removed by a gc: its live chunks are in a newer pack
                size = packs[pack][0]
                if any(o + n > size for _d, o, n in entries):
                    log.warning("%s: index %s lists chunks outside pack %s; not using it", self.url, iname, pack)
                    continue
                covered.add(pack)
                contents[pack] = entries
                for d, o, n in entries:
                    index[d] = _Loc(pack, o, n)
        orphans = [p for p in packs if p not in covered and p not in self.writer.uploading]
        adopted: list[tuple[str, list[Entry]]] = []
        bad = set()
        for pack in orphans:
            try:
                adopted.append((pack, self._read_trailer(pack, packs[pack][0])))
            except NotFound:
                continue
            except StoreError as e:
                log.warning("%s: pack %s has no usable index and its trailer is refused: %s", self.url, pack, e)
                bad.add(pack)
        if adopted:
            name = f"index/{secrets.token_hex(16)}"
            try:  # best effort: the packs are durable, the next reader adopts them again otherwise
                self.objects.retry(f"write {name}", lambda: self.objects.put_object(name, encode_index(adopted)))
                log.warning("%s: rebuilt the index of %d pack(s) from their trailers", self.url, len(adopted))
            except StoreError as e:
                log.warning("%s: cannot write the rebuilt index of %d pack(s): %s", self.url, len(adopted), e)
            indexes[name] = dict(adopted)  # an unwritten one is not listed next time: adopted again then
            for pack, entries in adopted:
                covered.add(pack)
                contents[pack] = entries
                for d, o, n in entries:
                    index[d] = _Loc(pack, o, n)
        with self._lock:
            self._indexes, self._packs, self._index, self._bad = indexes, packs, index, bad
            self._contents = contents
            self._loaded = True
            self._reloads += 1
        self._windows.clear()

    def _read_trailer(self, pack: str, size: int) -> list[Entry]:
        return read_trailer(self.objects, pack, size, f"{self.url} pack {pack}")

    def _register(self, flushed: list[tuple[str, str, list[Entry]]]) -> None:
        with self._lock:
            for index, pack, entries in flushed:
                self._indexes.setdefault(index, {})[pack] = entries
                self._contents[pack] = entries
                self._packs[pack] = (entries[-1][1] + entries[-1][2] if entries else 0, time.time())
                for d, o, n in entries:
                    self._index[d] = _Loc(pack, o, n)

    # ------------------------------------------------------------------ the chunk methods
    def has_chunk(self, digest: str) -> bool:
        self._ensure()
        seen = self._reloads
        if digest in self._index or self.objects.object_exists(loose_name(digest)):
            return True
        self._refresh(seen)  # packed by another writer since the indexes were read
        return digest in self._index

    def put_chunk(self, digest: str, data: bytes) -> None:
        self.writer.add(digest, data)

    def get_chunk(self, digest: str) -> bytes:
        self._ensure()
        for attempt in range(2):
            seen = self._reloads
            loc = self._index.get(digest)
            if loc is not None:
                try:
                    size = self._packs.get(loc.pack, (0, 0.0))[0]
                    return self._windows.read(loc.pack, size, loc.offset, loc.length)
                except NotFound:
                    pass  # rewritten by a gc since the index was read
            else:
                try:
                    return self.objects.get_object(loose_name(digest), MAX_CHUNK_OBJECT)
                except NotFound:
                    pass
            if attempt == 0:
                self._refresh(seen)
        raise NotFound(f"chunk {digest} not found")

    def get_chunk_alone(self, digest: str) -> bytes:
        """One chunk's bytes of its pack (a ranged GET of just them, or a window already fetched): a random
        read must not fetch a whole window, nor start the planned read-ahead from there."""
        self._ensure()
        loc = self._index.get(digest)
        if loc is not None:
            cached = self._windows.cached(loc.pack, loc.offset, loc.length)
            if cached is not None:
                return cached
            try:
                return self.objects.get_range(pack_name(loc.pack), loc.offset, loc.length)
            except NotFound:
                pass  # rewritten by a gc since the index was read: the full lookup refreshes it
        return self.get_chunk(digest)

    def plan_reads(self, digests: Iterable[str]) -> None:
        """The chunks a restore will ask for, in its order: their windows are fetched ahead."""
        self._ensure()
        windows: list[Window] = []
        spans: dict[Window, Span] = {}
        with self._lock:
            for d in digests:
                loc = self._index.get(d)
                if loc is None:
                    continue
                first, end = loc.offset, loc.offset + loc.length
                w = (loc.pack, first // READ_WINDOW)
                if (end - 1) // READ_WINDOW != w[1]:
                    continue  # straddles two windows: read on its own
                span = spans.get(w)
                if span is None:
                    windows.append(w)
                    spans[w] = (first, end)
                else:
                    spans[w] = (min(span[0], first), max(span[1], end))
            sizes = {p: size for p, (size, _mtime) in self._packs.items()}
        self._windows.plan(windows, spans, sizes)

    def delete_chunk(self, digest: str) -> None:
        if digest in self._loose:
            self.objects.delete_object(loose_name(digest))
            self._loose.pop(digest, None)
        if digest in self._index:
            self._doomed.add(digest)

    def list_chunks(self) -> Iterator[tuple[str, float]]:
        self.reload()
        loose = {}
        for name, _size, mtime in self.objects.list_objects("chunks/"):
            digest = name.rsplit("/", 1)[-1]
            if re.fullmatch(r"[0-9a-f]{64}", digest) and name == loose_name(digest):
                loose[digest] = mtime
        with self._lock:
            self._loose = loose
            packed = [(d, self._packs[loc.pack][1]) for d, loc in self._index.items()]
        yield from packed
        yield from loose.items()

    def flush(self) -> None:
        self._register(self.writer.flush())

    def check_durable(self, chunks: set[str]) -> None:
        """Refuse to commit a manifest naming a chunk not in an indexed pack or a loose object."""
        missing = chunks - self._index.keys() - self._loose.keys()
        if missing:
            self.reload()
            missing = {d for d in missing if d not in self._index and not self.has_chunk(d)}
        if missing:
            raise StoreError(
                f"{self.url}: {len(missing)} chunk(s) of this checkpoint are not stored (a pack upload failed?), "
                f"e.g. {sorted(missing)[0]}; not committed"
            )

    def abandon(self) -> None:
        self.writer.abandon()

    def close(self) -> None:
        self.writer.close()
        self._windows.close()

    # ------------------------------------------------------------------ gc
    def finish_gc(self, grace_seconds: float, proceed: Callable[[], bool]) -> None:
        """Delete packs with no live chunk, rewrite packs whose dead share reached REPACK_SHARE, then
        replace the indexes naming removed packs; proceed() before each removal.

        A chunk is dead in a pack when gc deleted it or when the index serves it from another pack (a
        copy a crashed rewrite left behind), so such leftovers are collected too."""
        doomed, self._doomed = self._doomed, set()
        with self._lock:
            contents = dict(self._contents)
            serving = {d: loc.pack for d, loc in self._index.items()}
        gone: list[tuple[str, list[Entry]]] = []
        rewrite: list[tuple[str, list[Entry]]] = []
        for pack, entries in sorted(contents.items()):
            live = [e for e in entries if e[0] not in doomed and serving.get(e[0]) == pack]
            total, kept = sum(n for _d, _o, n in entries), sum(n for _d, _o, n in live)
            if kept == total or (live and total - kept < REPACK_SHARE * total):
                continue  # nothing dead, or not worth a rewrite yet: its dead chunks stay readable
            (rewrite if live else gone).append((pack, live))
        if rewrite:
            self._rewrite(rewrite)  # the live chunks are stored and indexed before any old pack goes
        crash_point("store.gc.before-unlink")
        removed: set[str] = set()
        for pack, _live in gone + rewrite:
            if not proceed():
                break
            self.objects.retry(f"delete pack {pack}", functools.partial(self.objects.delete_object, pack_name(pack)))
            crash_point("store.gc.after-pack-delete")
            removed.add(pack)
            self._forget_pack(pack)
        else:
            cutoff = time.time() - grace_seconds
            for pack in sorted(self._bad):
                size_mtime = self._packs.get(pack)
                if size_mtime is None or size_mtime[1] >= cutoff:
                    continue
                if not proceed():
                    break
                log.warning("%s: deleting pack %s: no index and no readable trailer", self.url, pack)
                delete = functools.partial(self.objects.delete_object, pack_name(pack))
                self.objects.retry(f"delete pack {pack}", delete)
                removed.add(pack)
                self._forget_pack(pack)
        self._bad -= removed
        self._replace_indexes(proceed)

    def _forget_pack(self, pack: str) -> None:
        with self._lock:
            for d, _o, _n in self._contents.pop(pack, []):
                loc = self._index.get(d)
                if loc is not None and loc.pack == pack:
                    del self._index[d]
            self._packs.pop(pack, None)

    def _rewrite(self, packs: list[tuple[str, list[Entry]]]) -> None:
        """Copy the live chunks of packs into new full packs, stored and indexed when this returns."""
        writer = PackWriter(self.objects, self.target, self.uploads)
        try:
            for pack, live in packs:
                start, end = min(o for _d, o, _n in live), max(o + n for _d, o, n in live)
                read = functools.partial(self.objects.get_range, pack_name(pack), start, end - start)
                data = self.objects.retry(f"read pack {pack}", read)
                for d, o, n in live:
                    writer.add(d, data[o - start : o - start + n])
            crash_point("store.gc.mid-rewrite")
            flushed = self.objects.retry("flush rewritten packs", writer.flush)
        finally:
            writer.close()
        self._register(flushed)

    def _replace_indexes(self, proceed: Callable[[], bool]) -> None:
        """An index naming a pack that is gone is replaced by one naming only its remaining packs."""
        with self._lock:
            stale = {
                n: {p: e for p, e in c.items() if p in self._packs}
                for n, c in self._indexes.items()
                if any(p not in self._packs for p in c)
            }
        for name, remaining in sorted(stale.items()):
            if not proceed():
                return
            if remaining:
                new = f"index/{secrets.token_hex(16)}"
                body = encode_index(sorted(remaining.items()))
                self.objects.retry(f"write {new}", functools.partial(self.objects.put_object, new, body))
                with self._lock:
                    self._indexes[new] = remaining
            crash_point("store.gc.before-index-delete")
            self.objects.retry(f"delete {name}", functools.partial(self.objects.delete_object, name))
            with self._lock:
                self._indexes.pop(name, None)
