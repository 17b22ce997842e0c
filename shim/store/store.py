"""The content-addressed checkpoint store: put, get, list, verify, prune, gc, delete."""

from __future__ import annotations

import builtins
import functools
import json
import logging
import os
import secrets
import shutil
import socket
import stat
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import blake3

from ..faults import crash_point, delay_point
from . import chunking, pages
from .backends.base import Backend, Damaged, NotFound, TooLarge
from .chunkcache import ChunkCache
from .chunking import Chunker
from .crypto import Keyring, StoreKey, sealed_manifest_key_id
from .deferred import DEFAULT_MEMORY, DeferredReader, DeferSplit
from .errors import (
    BackendUnavailable,
    CheckpointNotFound,
    ChunkCorrupt,
    Fenced,
    KeyMismatch,
    ManifestCorrupt,
    ManifestTooNew,
    StoreError,
)
from .gcpause import gc_paused
from .get_timing import FileSpan, GetTimings, Stopwatch
from .growing import DEFAULT_BUDGET as DEFAULT_STREAM_BUDGET
from .growing import GrowingTree, put_growing
from .keys import validate_key
from .limits import chunk_object_limit
from .locks import HeldLock, LockWatcher
from .model import PAGE_HASH, ZERO, CheckpointInfo, Manifest, looks_like_manifest, manifest_name, parse_manifest_name
from .walk import TreeWriter, data_extents, scan_tree

log = logging.getLogger(__name__)
Progress = Callable[[int, int], None]


class _Aborted(Exception):
    """A chunk skipped because another chunk of the same put already failed."""


class _Counter:
    """Thread-safe byte counter that reports progress."""

    def __init__(self, total: int, progress: Progress | None) -> None:
        self.total, self.done, self.progress = total, 0, progress
        self.lock = threading.Lock()

    def add(self, n: int) -> None:
        with self.lock:
            self.done += n
            done = self.done
        if self.progress:
            self.progress(done, self.total)


class Store:
    def __init__(
        self,
        backend: Backend,
        chunker: Chunker | None = None,
        workers: int = 8,
        level: int = 1,
        lock_stale: float = 120.0,
        max_inflight: int | None = None,
        keyring: Keyring | None = None,
        allow_plaintext: bool = False,
        page_chunker: Chunker | None = None,
    ) -> None:
        """chunker cuts files; page_chunker the new pages of page images (deduplicated page by page, so
        their chunks need not be small). keyring: encrypt everything this Store writes with
        keyring.current and read only checkpoints sealed by one of its keys (plaintext ones too with
        allow_plaintext); None: a plaintext store, which refuses encrypted checkpoints with KeyMismatch."""
        self.backend = backend
        self.chunker = chunker or Chunker()
        self.page_chunker = page_chunker or Chunker.for_pages()
        self.workers = workers
        self.level = level
        self.lock_stale = lock_stale
        self._watcher = LockWatcher(backend, lock_stale)
        self.keyring = keyring
        self.allow_plaintext = allow_plaintext
        # Bounded memory: at most this many chunks read but not yet stored (or fetched, not written).
        self.max_inflight = max_inflight or workers * 4
        # The manifest a listing for a restore just loaded, for the get that follows (a large job's manifest
        # costs a GET and a second of decoding per GiB or so); taken by the next _load of the same name.
        self._handed: tuple[str, str, Manifest] | None = None

    @property
    def url(self) -> str:
        return self.backend.url

    def close(self) -> None:
        self._handed = None
        self.backend.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ naming and listing
    def _names(self, key: str | None) -> dict[str, dict[int, list[str]]]:
        """key -> seq -> manifest names (nonce order). More than one name per seq is a commit race."""
        out: dict[str, dict[int, list[str]]] = {}
        for k, name in self.backend.retry("list manifests", lambda: self.backend.list_manifests(key)):
            parsed = parse_manifest_name(name)
            if parsed is None:
                continue
            out.setdefault(k, {}).setdefault(parsed[0], []).append(name)
        for seqs in out.values():
            for names in seqs.values():
                names.sort()
        return out

    def _committed(self, key: str) -> dict[int, str]:
        """seq -> the manifest name that readers use for it (lowest nonce)."""
        return {seq: names[0] for seq, names in self._names(key).get(key, {}).items()}

    def _load(self, key: str, name: str, any_plaintext: bool = False, hand_on: bool = False) -> Manifest:
        """The decoded, validated manifest `name` of key. hand_on: keep it for the next _load of that name
        (a restore's listing, then its get: the committed manifest under a name never changes)."""
        handed, self._handed = self._handed, None
        m = handed[2] if handed is not None and handed[:2] == (key, name) else self._decode(key, name, any_plaintext)
        if hand_on:
            self._handed = (key, name, m)
        return m

    def _decode(self, key: str, name: str, any_plaintext: bool) -> Manifest:
        what = f"manifest of {key!r} {name}"
        try:
            blob = self.backend.retry(f"get {what}", lambda: self.backend.get_manifest(key, name))
        except NotFound:
            raise CheckpointNotFound(f"{what} disappeared (deleted concurrently?)") from None
        except TooLarge as e:
            raise ManifestCorrupt(f"{what}: {e}") from None
        sealed_with = None
        key_id = sealed_manifest_key_id(blob)
        if key_id is not None:
            if self.keyring is None:
                raise KeyMismatch(f"{what} is encrypted (key {key_id}) and this store has no key; give its key file")
            try:
                blob, sealed_with = self.keyring.open_manifest(blob, what)
            except ValueError as e:
                raise ManifestCorrupt(f"{what} {e}") from None
        elif self.keyring is not None and not (self.allow_plaintext or any_plaintext) and looks_like_manifest(blob):
            raise KeyMismatch(f"{what} is not encrypted and this store reads only encrypted checkpoints")
        with gc_paused():
            m = Manifest.decode(blob, what)
        m.sealed_with = sealed_with
        if m.key != key:
            raise ManifestCorrupt(f"{what} names key {m.key!r}")
        parsed = parse_manifest_name(name)
        if parsed is not None and m.seq != parsed[0]:
            raise ManifestCorrupt(f"{what} claims seq {m.seq}")
        return m

    def list(self, key: str | None = None) -> list[CheckpointInfo]:
        infos = []
        for k, seqs in sorted(self._names(key).items()):
            for _seq, names in sorted(seqs.items()):
                try:
                    infos.append(self._load(k, names[0]).info(names[0]))
                except (ManifestCorrupt, CheckpointNotFound) as e:
                    log.warning("skipping checkpoint: %s", e)
        return infos

    def newest_first(self, key: str) -> Iterator[CheckpointInfo]:
        """The key's committed checkpoints, newest first, like list() but each manifest loaded only when
        the caller asks for the next one: a restore mostly uses the newest, and a large job's manifest
        costs a GET and its decoding."""
        seqs = self._names(key).get(key, {})
        for seq in sorted(seqs, reverse=True):
            name = seqs[seq][0]
            try:
                yield self._load(key, name, hand_on=True).info(name)
            except (ManifestCorrupt, CheckpointNotFound) as e:
                log.warning("skipping checkpoint: %s", e)

    def latest(self, key: str, verify: bool = False) -> CheckpointInfo | None:
        """Newest committed checkpoint whose manifest decodes (and, with verify, whose chunks verify)."""
        for seq, name in sorted(self._committed(key).items(), reverse=True):
            try:
                m = self._load(key, name)
            except (ManifestCorrupt, CheckpointNotFound) as e:
                log.warning("checkpoint %r seq %d unusable, trying an older one: %s", key, seq, e)
                continue
            if verify:
                problems = self._verify_manifests([m], set())
                if problems:
                    log.warning(
                        "checkpoint %r seq %d fails verification, trying an older one: %s",
                        key,
                        seq,
                        "; ".join(problems),
                    )
                    continue
            return m.info(name)
        return None

    # ------------------------------------------------------------------ put
    def put(
        self,
        key: str,
        src_dir: Path,
        metadata: dict[str, Any] | None = None,
        progress: Progress | None = None,
        epoch: int | None = None,
        page_images: Sequence[str] = (),
    ) -> CheckpointInfo:
        """Store src_dir as the next checkpoint of key.

        page_images: glob patterns (fnmatch, on paths relative to src_dir) of memory page images; those
        are deduplicated page by page against the key's newest checkpoint (shim.store.pages).

        With epoch (from claim()), the put is refused with Fenced if another owner claimed the key since,
        checked at the start, right before the manifest is written and once more after it (then the
        manifest is removed again). A put never waits for gc (see gc() for why that is safe).
        """
        validate_key(key)
        src = Path(src_dir)
        if not src.is_dir():
            raise StoreError(f"put {key!r}: {src} is not a directory")
        if epoch is not None:
            self._check_epoch(key, epoch)
        nonce = secrets.token_hex(6)
        with HeldLock(self.backend, f"put-{nonce}", self.lock_stale) as lock:
            parent, known, listed = self._dedup_base(key)
            entries = scan_tree(src)
            page_images = pages.usable_patterns(entries, page_images, key)
            index = self._page_index(parent, known) if page_images and parent is not None else None
            manifest = Manifest(
                key=key,
                seq=0,
                parent=None,
                created=time.time(),
                chunker=self.describe_chunkers(bool(page_images)),
                metadata=dict(metadata or {}),
                entries=entries,
                stats={},
                epoch=epoch,
            )
            try:  # refuse before uploading anything what a reader would refuse (e.g. a symlink out of src)
                manifest.check(f"put {key!r} of {src}")
            except ManifestCorrupt as e:
                raise StoreError(f"{e}: not stored") from None
            reused: dict[str, tuple[Path | None, int, int]] = {}
            tables: builtins.list[dict[str, Any]] = []
            manifest.stats = self._upload(
                src,
                entries,
                known,
                progress,
                listed=listed,
                reused=reused,
                page_images=page_images,
                index=index,
                tables=tables,
            )
            manifest.page_table = tables[0] if tables else None
            info = self._finish_put(manifest, f"put {key!r} of {src}", reused, nonce, lock)
        log.info(
            "put %r seq %d: %d files, %d bytes read, %d uploaded (%d/%d chunks new)",
            key,
            info.seq,
            info.files,
            info.bytes_read,
            info.bytes_uploaded,
            info.chunks_new,
            info.chunks_total,
        )
        return info

    def _dedup_base(self, key: str) -> tuple[Manifest | None, set[str], bool]:
        """What a put of key dedups against: the key's newest checkpoint (None if none or unreadable), the
        chunks known to be stored, and whether those come from a full listing of the store."""
        committed = self._committed(key)
        known: set[str] = set()
        parent: Manifest | None = None
        if committed:
            try:
                parent = self._load(key, committed[max(committed)])
                known = parent.chunk_digests()
            except (ManifestCorrupt, CheckpointNotFound) as e:
                log.warning("newest checkpoint of %r unreadable, not using it for dedup: %s", key, e)
        # One listing instead of a HEAD/stat per chunk, where the backend can list (file, S3). A gc may
        # delete some of these chunks meanwhile: the put re-checks the ones it reused before committing
        # (_replace_vanished).
        listing = self.backend.retry("list chunks", lambda: self._chunk_names())
        if listing is not None:
            known |= listing
        return parent, known, listing is not None

    def _finish_put(
        self,
        manifest: Manifest,
        where: str,
        reused: Mapping[str, tuple[Path | None, int, int]],
        nonce: str,
        lock: HeldLock,
    ) -> CheckpointInfo:
        """The end of every put (staged or streamed), once each chunk is uploaded: check the manifest as a
        reader will, upload again what a concurrent gc swept of the chunks reused, commit."""
        try:
            manifest.check(where)
        except ManifestCorrupt as e:
            raise StoreError(f"{e}: not committed") from None
        delay_point("store.put.before_commit")
        self._replace_vanished(reused, manifest.stats)
        return self._commit(manifest, nonce, lock)

    def put_growing(
        self,
        key: str,
        tree: GrowingTree,
        progress: Progress | None = None,
        epoch: int | None = None,
        budget: int = DEFAULT_STREAM_BUDGET,
        page_images: Sequence[str] = (),
    ) -> CheckpointInfo:
        """Store a directory its producer is still writing, uploading while it grows (shim.store.growing);
        page_images as for put()."""
        return put_growing(self, key, tree, progress=progress, epoch=epoch, budget=budget, page_images=page_images)

    def _chunk_names(self) -> set[str] | None:
        listing = self.backend.list_chunks()
        return None if listing is None else {d for d, _mtime in listing}

    def _upload(
        self,
        src: Path,
        entries: builtins.list[dict[str, Any]],
        known: set[str],
        progress: Progress | None,
        listed: bool = False,
        reused: dict[str, tuple[Path | None, int, int]] | None = None,
        page_images: Sequence[str] = (),
        index: pages.PageIndex | None = None,
        tables: builtins.list[dict[str, Any]] | None = None,
    ) -> dict[str, int]:
        """Chunk and upload the files; reused gets (file, offset, length) of each chunk found already stored
        (file None: a chunk of page-image data, which cannot be read back from one place).

        Files matching page_images are deduplicated page by page against index (the parent's pages);
        their page table is appended to tables."""
        reused = {} if reused is None else reused
        files = [e for e in entries if e["type"] == "file"]
        counter = _Counter(sum(e["size"] for e in files), progress)
        stats = {"bytes_read": 0, "bytes_uploaded": 0, "chunks_total": 0, "chunks_new": 0}
        lock = threading.Lock()
        inflight: dict[str, threading.Lock] = {}
        mine: set[str] = set()  # uploaded by this put: not "reused", even when they repeat
        slots = threading.BoundedSemaphore(self.max_inflight)
        backend = self.backend

        abort = threading.Event()  # first failure stops the rest quickly (no retry storm)

        def store_chunk(path: Path | None, fd: int, off: int, length: int, data: bytes | memoryview | None) -> str:
            try:
                if abort.is_set():
                    raise _Aborted
                if data is None:
                    data = os.pread(fd, length, off)
                if len(data) != length:
                    raise StoreError(f"short read at {off} (file changed during put?)")
                if chunking.is_zero(data):
                    return ZERO
                digest = self._digest(data)
                with lock:
                    if digest in known:
                        if digest not in mine:
                            reused.setdefault(digest, (path, off, length))
                        return digest
                    busy = inflight.get(digest)
                    if busy is None:  # ours to upload: held until done (a plain lock: cheaper than an Event)
                        busy = inflight[digest] = threading.Lock()
                        busy.acquire()
                        owner = True
                    else:
                        owner = False
                if not owner:
                    with busy:  # another worker uploads the same chunk: wait for it
                        return digest
                uploaded = -1
                try:
                    if listed or not backend.retry("check chunk", lambda: backend.has_chunk(digest)):
                        blob = self._encode_chunk(digest, data)
                        backend.retry(f"upload chunk {digest}", lambda: backend.put_chunk(digest, blob))
                        crash_point("store.put.after-chunk")
                        uploaded = len(blob)
                    else:
                        uploaded = 0
                finally:
                    with lock:
                        del inflight[digest]
                        if uploaded > 0:
                            mine.add(digest)
                            stats["bytes_uploaded"] += uploaded
                            stats["chunks_new"] += 1
                        elif uploaded == 0:
                            reused.setdefault(digest, (path, off, length))
                        if uploaded >= 0:
                            known.add(digest)
                    busy.release()
                return digest
            except _Aborted:
                raise
            except BaseException:
                abort.set()
                raise
            finally:
                slots.release()
                counter.add(length)

        open_files: deque[tuple[int, list[tuple[list[Any], Future[str]]]]] = deque()
        failed: list[BaseException] = []
        page_futures: list[Future[builtins.list[str]]] = []

        def store_chunks(data: bytes | memoryview, lengths: Sequence[int]) -> builtins.list[str]:
            """A batch of consecutive page-image chunks, one slot each (store_chunk frees its own)."""
            view = memoryview(data)
            digests: builtins.list[str] = []
            pos = 0
            try:
                for n in lengths:
                    digests.append(store_chunk(None, -1, 0, n, view[pos : pos + n]))
                    pos += n
            except BaseException:
                for _ in range(len(lengths) - len(digests) - 1):
                    slots.release()
                raise
            return digests

        def submit_pages(data: bytes | memoryview, lengths: Sequence[int]) -> Future[builtins.list[str]]:
            for _ in lengths:
                slots.acquire()
            fut = pool.submit(store_chunks, data, lengths)
            page_futures.append(fut)
            return fut

        planner = (
            pages.PagePlanner(index, self.page_chunker, submit_pages, pages.batch_limit(self.max_inflight))
            if page_images
            else None
        )

        def finish(fd: int, pending: list[tuple[list[Any], Future[str]]]) -> None:
            try:
                for ref, fut in pending:
                    try:
                        ref[2] = fut.result()
                    except _Aborted:
                        pass
                    except BaseException as e:  # collect, re-raise the first after draining
                        failed.append(e)
            finally:
                os.close(fd)

        with ThreadPoolExecutor(self.workers, thread_name_prefix="revenant-put") as pool:
            try:
                for e in files:
                    if abort.is_set():
                        break
                    if planner is not None and pages.matches(e["path"], page_images):
                        e["pages"] = True
                        before = planner.found_bytes + planner.zero_bytes
                        fd = os.open(src / e["path"], os.O_RDONLY)
                        try:
                            planner.add_file(e, fd)
                        finally:
                            os.close(fd)
                        counter.add(planner.found_bytes + planner.zero_bytes - before)
                        stats["bytes_read"] += e["size"]
                        continue
                    fd = os.open(src / e["path"], os.O_RDONLY)
                    pending: list[tuple[list[Any], Future[str]]] = []
                    open_files.append((fd, pending))
                    data_bytes = 0
                    for ext_off, ext_len in data_extents(fd, e["size"]):
                        data_bytes += ext_len
                        for off, length, chunk in self._cuts(fd, ext_off, ext_len):
                            if abort.is_set():
                                break
                            slots.acquire()
                            ref: list[Any] = [off, length, None]
                            e["chunks"].append(ref)
                            pending.append((ref, pool.submit(store_chunk, src / e["path"], fd, off, length, chunk)))
                            stats["bytes_read"] += length
                            stats["chunks_total"] += 1
                    counter.add(e["size"] - data_bytes)  # holes count as done: progress ends at 100%
                    while len(open_files) > 32:
                        finish(*open_files.popleft())
                if planner is not None and not abort.is_set():
                    planner.finish()
            finally:
                while open_files:
                    finish(*open_files.popleft())
        for fut in page_futures:
            exc = fut.exception()
            if exc is not None and not isinstance(exc, _Aborted):
                failed.append(exc)
        if failed:
            raise failed[0]
        if abort.is_set():
            raise StoreError("put aborted")
        if planner is not None:

            def store_now(data: memoryview) -> str:
                slots.acquire()
                return store_chunk(None, -1, 0, len(data), data)

            table = self._finish_pages(planner, store_now, mine, reused, stats, counter)
            if table is not None and tables is not None:
                tables.append(table)
        return stats

    def _finish_pages(
        self,
        planner: pages.PagePlanner,
        store_now: Callable[[memoryview], str],
        mine: set[str],
        reused: dict[str, tuple[Path | None, int, int]],
        stats: dict[str, int],
        counter: _Counter | None = None,
    ) -> dict[str, Any] | None:
        """Fill the page-image files' references, pin the chunks they reuse, store their page table (one
        chunk at a time through store_now); the manifest's page_table, None without page-image files.
        Used by the staged put and the streamed one (shim.store.growing) alike."""
        if not planner.files:
            return None
        planner.resolve()
        for f in planner.files:
            stats["chunks_total"] += len(f.entry["chunks"])
            for ref in f.entry["chunks"]:
                if ref[2] != ZERO and ref[2] not in mine:
                    reused.setdefault(ref[2], (None, 0, ref[1]))
        table = planner.table()
        if counter is not None:
            counter.total += len(table)
        refs: builtins.list[builtins.list[Any]] = []
        view = memoryview(table)
        for off, length in self.chunker.cuts(view) if table else ():
            digest = store_now(view[off : off + length])
            refs.append([off, length, digest])
            if digest not in mine:
                reused.setdefault(digest, (None, 0, length))
        log.info(
            "page images: %d bytes found in the parent, %d zero, %d new (%d windows too finely changed to "
            "reference, uploaded whole); page table %d bytes",
            planner.found_bytes,
            planner.zero_bytes,
            planner.new_bytes,
            planner.fallback_windows,
            len(table),
        )
        return {"hash": PAGE_HASH, "size": len(table), "chunks": refs}

    def _page_index(self, parent: Manifest, known: set[str]) -> pages.PageIndex | None:
        """The parent's pages by content, or None where its page table cannot be used."""
        if parent.page_table is None:
            return None
        current = self.keyring.current if self.keyring is not None else None
        if (parent.sealed_with is None) != (current is None) or (
            current is not None and parent.sealed_with.key_id != current.key_id
        ):
            return None  # chunk ids differ under another key: nothing to share
        where = f"page table of {parent.key!r} seq {parent.seq}"
        try:
            table = b"".join(
                self._fetch_verified(d, n, where, parent.sealed_with) for _o, n, d in parent.page_table["chunks"]
            )
            return pages.PageIndex(parent, table, known.__contains__)
        except (ChunkCorrupt, ValueError) as e:
            log.warning("%s unusable, page images are stored without it: %s", where, e)
            return None

    def _replace_vanished(self, reused: Mapping[str, tuple[Path | None, int, int]], stats: dict[str, int]) -> None:
        """Upload again, from the source, every reused chunk that is gone now (a gc swept it meanwhile)."""
        if not reused:
            return
        b = self.backend
        listing = b.retry("list chunks", lambda: self._chunk_names())
        if listing is None:
            missing = [d for d in reused if not b.retry("check chunk", functools.partial(b.has_chunk, d))]
        else:
            missing = [d for d in reused if d not in listing]
        for digest in missing:
            path, off, length = reused[digest]
            if path is None:
                raise StoreError(
                    f"put: chunk {digest}, reused for page images, was removed by a concurrent gc; nothing committed"
                )
            with open(path, "rb") as f:
                data = os.pread(f.fileno(), length, off)
            if len(data) != length or self._digest(data) != digest:
                raise StoreError(f"put: {path} changed during the put (offset {off}); nothing committed")
            blob = self._encode_chunk(digest, data)
            b.retry(f"upload chunk {digest}", functools.partial(b.put_chunk, digest, blob))
            stats["bytes_uploaded"] += len(blob)
            stats["chunks_new"] += 1
        if missing:
            log.warning("put: %d reused chunks were removed by a concurrent gc; uploaded them again", len(missing))

    def describe_chunkers(self, page_images: bool) -> str:
        """The manifest's chunker field: files' chunker, and the new pages' where page images are planned."""
        files = self.chunker.describe()
        return f"{files} pages={self.page_chunker.describe()}" if page_images else files

    def _digest(self, data: bytes | memoryview) -> str:
        """A chunk's id: plain BLAKE3, or keyed BLAKE3 under the current key of an encrypted store."""
        if self.keyring is not None:
            return self.keyring.current.chunk_id(data)
        return blake3.blake3(data, max_threads=1).hexdigest()

    def _encode_chunk(self, digest: str, data: bytes | memoryview) -> bytes:
        blob = chunking.encode_chunk(data, self.level)
        return blob if self.keyring is None else self.keyring.current.seal_chunk(digest, blob)

    def _cuts(self, fd: int, ext_off: int, ext_len: int) -> Iterator[tuple[int, int, memoryview | None]]:
        """(offset, length, data or None) of each chunk of one data extent; None = worker reads it."""
        if self.chunker.kind == "fixed":
            # Boundaries on absolute multiples of the size, so extents split the same way every time.
            size = self.chunker.size
            off, end = ext_off, ext_off + ext_len
            while off < end:
                nxt = min((off // size + 1) * size, end)
                yield off, nxt - off, None
                off = nxt
            return
        # Content-defined: read the extent in 16 MiB windows with pread (an mmap paid a page fault per
        # 4 KiB, slower than the cutting itself) and hand workers slices of the window: one read per
        # byte, memory bounded by the windows whose chunks are in flight.
        window = max(16 << 20, self.chunker.size * 16)
        pos = ext_off
        end = ext_off + ext_len
        while pos < end:
            buf = os.pread(fd, min(window, end - pos), pos)
            if not buf:
                raise StoreError(f"short read at {pos} (file changed during put?)")
            view = memoryview(buf)
            last_full = pos + len(buf) >= end
            consumed = 0
            for off, length in self.chunker.cuts(view):
                # The last chunk of a window is provisional unless the window reaches the end.
                if not last_full and off + length == len(buf):
                    break
                yield pos + off, length, view[off : off + length]
                consumed = off + length
            if consumed == 0:
                consumed = len(buf)  # pathological: no cut in a whole window
                yield pos, consumed, view
            pos += consumed

    def _commit(self, manifest: Manifest, nonce: str, lock: HeldLock) -> CheckpointInfo:
        """Write the manifest last; resolve a race with another writer of the same key.

        Right before each manifest write: every chunk durable, our lock still fresh, our epoch current."""
        key = manifest.key
        digests = manifest.chunk_digests()
        old_name: str | None = None
        for _attempt in range(50):
            names = self._names(key).get(key, {})
            winners = {s: n[0] for s, n in names.items()}
            manifest.seq = max(names, default=0) + 1
            manifest.parent = max((s for s in winners if winners[s] != old_name), default=None)
            name = manifest_name(manifest.seq, nonce)
            data = manifest.encode()
            if self.keyring is not None:
                data = self.keyring.current.seal_manifest(data)
            self.backend.retry("flush chunks", self.backend.flush_chunks)
            lock.check(f"put {key!r}")
            if manifest.epoch is not None:
                self._check_epoch(key, manifest.epoch)
            crash_point("store.put.before-manifest")
            delay_point("store.put.before-manifest")
            self.backend.retry("write manifest", functools.partial(self.backend.put_manifest, key, name, data, digests))
            crash_point("store.put.after-manifest")
            if manifest.epoch is not None:
                try:
                    self._check_epoch(key, manifest.epoch)
                except Fenced:  # a claim landed while we wrote: take the manifest back
                    self.backend.retry(
                        "remove fenced manifest", functools.partial(self.backend.delete_manifest, key, name)
                    )
                    if old_name:
                        self.backend.retry(
                            "remove superseded manifest", functools.partial(self.backend.delete_manifest, key, old_name)
                        )
                    self.backend.manifests_changed(key)
                    raise
            if old_name:
                self.backend.retry(
                    "remove superseded manifest", functools.partial(self.backend.delete_manifest, key, old_name)
                )
            others = [n for n in self._names(key).get(key, {}).get(manifest.seq, []) if n != name]
            if not others:
                self.backend.manifests_changed(key)
                return manifest.info(name)
            # Another writer took this seq: whoever sees the clash moves up (the other may have returned).
            log.info("put %r: seq %d taken concurrently by %s, moving up", key, manifest.seq, others)
            old_name = name
            time.sleep(secrets.randbelow(100) / 1000)
        raise StoreError(f"put {key!r}: could not commit after 50 attempts (too many concurrent writers)")

    # ------------------------------------------------------------------ fencing
    @property
    def can_fence(self) -> bool:
        """Whether the backend keeps owner epochs (file://, s3://, az://, gs://); a registry cannot."""
        return type(self.backend).create_epoch is not Backend.create_epoch

    def claim(self, key: str, owner: str) -> int:
        """Become the owner of key: take the next epoch (1, 2, ...) and return it.

        Puts with an older epoch are refused from then on (Fenced). Each epoch is a create-only object,
        so two claimers never get the same number; the later claim wins.
        """
        validate_key(key)
        b = self.backend
        body = json.dumps({"owner": owner, "host": socket.gethostname(), "pid": os.getpid(), "time": time.time()})
        for _attempt in range(50):
            n = self.epoch(key) + 1
            if b.retry("claim epoch", functools.partial(b.create_epoch, key, n, body.encode())):
                log.info("claimed %r: epoch %d for %s", key, n, owner)
                return n
            time.sleep(secrets.randbelow(50) / 1000)  # another node took n: try the next
        raise StoreError(f"claim {key!r}: could not take an epoch after 50 attempts (too many claimers)")

    def epoch(self, key: str) -> int:
        """The key's current owner epoch; 0 if no one ever claimed it."""
        return max(self.backend.retry("list epochs", lambda: self.backend.list_epochs(validate_key(key))), default=0)

    def _check_epoch(self, key: str, epoch: int) -> None:
        current = self.epoch(key)
        if current > epoch:
            raise Fenced(key, epoch, current)
        if current < epoch:
            raise StoreError(f"put {key!r}: epoch {epoch} was never claimed (current epoch {current})")

    # ------------------------------------------------------------------ get
    def get(
        self,
        key: str,
        dest_dir: Path,
        seq: int | None = None,
        fallback: bool = True,
        progress: Progress | None = None,
        timings: GetTimings | None = None,
    ) -> CheckpointInfo:
        """Restore a checkpoint into dest_dir (absent or empty); timings, if given, learns where the time
        went (shim.store.get_timing)."""
        m, name = self._get(key, Path(dest_dir), seq, fallback, progress, timings)
        return m.info(name)

    def get_deferred(
        self,
        key: str,
        dest_dir: Path,
        may_defer: Callable[[str], bool],
        defer: Callable[[Path], Mapping[str, Sequence[tuple[int, int]]]],
        seq: int | None = None,
        fallback: bool = True,
        progress: Progress | None = None,
        timings: GetTimings | None = None,
        memory_limit: int = DEFAULT_MEMORY,
        fill: bool = True,
        fill_later: bool = False,
    ) -> tuple[CheckpointInfo, DeferredReader]:
        """get() for a lazy restore: the files may_defer names are written last, without the byte ranges
        defer (called with the partial root once every other file is written) returns for them; those
        stay holes, filled in the background (unless fill is False; from reader.start_fill() on with
        fill_later) and read, verified, through the returned DeferredReader (close it before the store).
        A deferred chunk the store does not list raises ChunkCorrupt now (dest is left as written), while
        an older checkpoint can still be chosen, not when a restored job faults on it.
        """
        split = DeferSplit(may_defer, defer)
        with gc_paused():  # what it builds is many small objects, no cycles; a job waits for it
            m, name = self._get(key, Path(dest_dir), seq, fallback, progress, timings, split)
            reader = DeferredReader(self, m, split.files, Path(dest_dir), memory_limit, fill, fill_later)
            try:
                reader.check_present()
            except BaseException:
                reader.close()
                raise
        return m.info(name), reader

    def _get(
        self,
        key: str,
        dest: Path,
        seq: int | None,
        fallback: bool,
        progress: Progress | None,
        timings: GetTimings | None,
        split: DeferSplit | None = None,
    ) -> tuple[Manifest, str]:
        """The manifest restored into dest, and its name: the newest usable one (or seq's)."""
        committed = self._committed(key)
        if seq is not None:
            if seq not in committed:
                raise CheckpointNotFound(f"no checkpoint {key!r} seq {seq} in {self.url}")
            order = [seq]
        else:
            order = sorted(committed, reverse=True)
            if not fallback:
                order = order[:1]
        if not order:
            raise CheckpointNotFound(f"no committed checkpoint for {key!r} in {self.url}")
        errors: list[str] = []
        last: StoreError | None = None
        for s in order:
            try:
                m = self._load(key, committed[s])
                self._restore(m, dest, progress, timings, split)
                if errors:
                    log.warning(
                        "restored %r from OLDER checkpoint seq %d because newer ones are damaged: %s",
                        key,
                        s,
                        "; ".join(errors),
                    )
                return m, committed[s]
            except (ChunkCorrupt, ManifestCorrupt, CheckpointNotFound) as e:
                last = e
                errors.append(f"seq {s}: {e}")
                if s != order[-1]:
                    log.warning("checkpoint %r seq %d is damaged, falling back: %s", key, s, e)
        assert last is not None
        if len(errors) == 1:
            raise last
        raise StoreError(f"no usable checkpoint for {key!r}: " + "; ".join(errors)) from last

    def _restore(
        self,
        m: Manifest,
        dest: Path,
        progress: Progress | None,
        timings: GetTimings | None = None,
        split: DeferSplit | None = None,
    ) -> None:
        """Build the tree in a fresh 0700 sibling dir, then rename it onto dest (absent or an empty dir)."""
        _check_destination(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.parent / f".{dest.name}.partial-{secrets.token_hex(4)}"
        tmp.mkdir(0o700)
        try:
            root_fd = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                started = time.monotonic()
                self._materialize(m, TreeWriter(root_fd, os.geteuid() == 0), progress, timings, split, tmp)
                if timings is not None:
                    timings.wall_s = time.monotonic() - started
            except OSError as e:
                raise StoreError(f"restore of {m.key!r} seq {m.seq} into {dest} failed: {e}") from e
            finally:
                os.close(root_fd)
            _check_destination(dest)
            if dest.exists():
                dest.rmdir()
            os.rename(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def _materialize(
        self,
        m: Manifest,
        tree: TreeWriter,
        progress: Progress | None,
        timings: GetTimings | None = None,
        split: DeferSplit | None = None,
        root: Path | None = None,
    ) -> None:
        """Write a validated manifest's entries below tree's root (at root); parents always precede children.

        split: the files it may defer are written after all others, without the ranges it decides then."""
        files = [e for e in m.entries if e["type"] == "file"]
        counter = _Counter(sum(c[1] for e in files for c in e["chunks"]), progress)
        slots = threading.BoundedSemaphore(self.max_inflight)
        cache = ChunkCache()  # chunks that slice references share

        def write(fd: int, view: memoryview, pos: int) -> None:
            watch = Stopwatch(timings)
            length = len(view)
            while view:
                n = os.pwrite(fd, view, pos)
                view, pos = view[n:], pos + n
            watch.lap("write_s")
            if timings is not None:
                timings.wrote(length)

        def fetch(fd: int, refs: builtins.list[Any], where: str) -> None:
            """Write refs, which all name one chunk (see _ref_groups): it is fetched and verified once."""
            digest = refs[0][2]
            try:
                if digest == ZERO:
                    if timings is not None:
                        timings.zero()
                    return  # a hole: ftruncate already made it read as zeros
                if len(refs[0]) == 5:
                    clen = refs[0][4]
                    data = cache.get(digest, lambda: self._fetch_verified(digest, clen, where, m.sealed_with, timings))
                    for off, length, _digest, coff, _clen in refs:
                        if coff + length > len(data):
                            raise ChunkCorrupt(digest, f"has {len(data)} bytes, no slice at {coff} of {length}", where)
                        write(fd, memoryview(data)[coff : coff + length], off)
                else:
                    off, length = refs[0][:2]
                    write(fd, memoryview(self._fetch_verified(digest, length, where, m.sealed_with, timings)), off)
            finally:
                slots.release()
                counter.add(sum(r[1] for r in refs))

        try:
            for e in m.entries:
                if e["type"] == "dir":
                    tree.mkdir(e["path"])
                elif e["type"] == "symlink":
                    tree.symlink(e["path"], e["target"])
            if split is None or root is None:
                self._write_files(m, files, tree, fetch, slots, timings)
            else:
                marks = [split.may_defer(e["path"]) for e in files]
                later = [e for e, mark in zip(files, marks, strict=True) if mark]
                first = [e for e, mark in zip(files, marks, strict=True) if not mark]
                self._write_files(m, first, tree, fetch, slots, timings)
                now = split.decide(m, root, later)
                counter.add(split.deferred_bytes)  # left for the reader: done as far as this get goes
                self._write_files(m, later, tree, fetch, slots, timings, now)
            # Metadata last, deepest first, so writing children does not disturb parents' mtimes.
            for e in sorted(m.entries, key=lambda e: e["path"].count("/"), reverse=True):
                tree.metadata(e)
        finally:
            tree.close()

    def _write_files(
        self,
        m: Manifest,
        files: Sequence[dict[str, Any]],
        tree: TreeWriter,
        fetch: Callable[[int, builtins.list[Any], str], None],
        slots: threading.BoundedSemaphore,
        timings: GetTimings | None = None,
        refs: Mapping[str, builtins.list[Any]] | None = None,
    ) -> None:
        """Fetch the files' chunks on the worker pool, smallest files first: CRIU's small images (and the
        writable layer) are complete before the page images, which take most of the time. refs: the
        references to write of some files instead of all of theirs (a deferred get)."""
        # Files still being written: (fd, its chunk futures). At most 32 stay open (a manifest may list
        # a million files), the oldest is finished and closed first.
        open_files: deque[tuple[int, list[Future[None]]]] = deque()

        def finish(fd: int, pending: list[Future[None]]) -> None:
            try:
                for f in pending:
                    f.result()
            finally:
                os.close(fd)

        files = sorted(files, key=lambda e: e["size"])
        refs = refs or {}
        groups = [_ref_groups(refs.get(e["path"], e["chunks"])) for e in files]
        self.backend.plan_reads(g[0][2] for file_groups in groups for g in file_groups if g[0][2] != ZERO)
        try:
            with ThreadPoolExecutor(self.workers, thread_name_prefix="revenant-get") as pool:
                for e, file_groups in zip(files, groups, strict=True):
                    fd = tree.create(e["path"])
                    pending: list[Future[None]] = []
                    open_files.append((fd, pending))
                    os.ftruncate(fd, e["size"])
                    span = timings.file(e["path"], e["size"]) if timings is not None else None
                    for group in file_groups:
                        slots.acquire()
                        where = f"{m.key!r} seq {m.seq}, file {e['path']} offset {group[0][0]}"
                        pending.append(pool.submit(fetch, fd, group, where))
                        if span is not None:
                            pending[-1].add_done_callback(functools.partial(_end_span, span))
                        if pending[0].done() and pending[0].exception():
                            pending[0].result()  # stop early on the first bad chunk
                    while len(open_files) > 32:
                        finish(*open_files.popleft())
                while open_files:
                    finish(*open_files.popleft())
        finally:
            while open_files:  # after a failure: the pool has drained, nothing writes to these any more
                os.close(open_files.popleft()[0])

    def _fetch_verified(
        self,
        digest: str,
        length: int,
        where: str,
        key: StoreKey | None = None,
        timings: GetTimings | None = None,
        alone: bool = False,
    ) -> bytes:
        """The chunk's data, checked against its id; key: the one that sealed the manifest naming it;
        alone: asked for out of the planned order (Backend.get_chunk_alone)."""
        watch = Stopwatch(timings)
        blob = self._get_blob(digest, where, alone)
        watch.lap("fetch_s")
        data = self._open_blob(digest, length, where, key, blob, watch)
        if timings is not None:
            timings.fetched(len(blob))
        return data

    def _get_blob(self, digest: str, where: str, alone: bool = False) -> bytes:
        """The chunk's stored object as it is (compressed, sealed): what a replica copies."""
        get = self.backend.get_chunk_alone if alone else self.backend.get_chunk
        try:
            return self.backend.retry(f"get chunk {digest}", lambda: get(digest))
        except NotFound:
            raise ChunkCorrupt(digest, "is missing", where) from None
        except (TooLarge, Damaged) as e:
            raise ChunkCorrupt(digest, str(e), where) from None

    def _open_blob(
        self, digest: str, length: int, where: str, key: StoreKey | None, blob: bytes, watch: Stopwatch | None = None
    ) -> bytes:
        """A stored chunk object checked against its id and opened: its data, or ChunkCorrupt. watch, if
        given, times the open, decode and verify parts of a restore."""
        watch = watch or Stopwatch(None)
        if len(blob) > chunk_object_limit(length, sealed=key is not None):
            raise ChunkCorrupt(digest, f"is a {len(blob)}-byte object, too large for {length} bytes of data", where)
        if key is not None:
            try:
                blob = key.open_chunk(digest, blob)
            except ValueError as e:
                raise ChunkCorrupt(digest, str(e), where) from None
            watch.lap("open_s")
        try:
            data = chunking.decode_chunk(blob, length)
        except chunking.ChunkDecodeError as e:
            raise ChunkCorrupt(digest, f"cannot be decoded: {e}", where) from e
        watch.lap("decode_s")
        actual = key.chunk_id(data) if key is not None else blake3.blake3(data, max_threads=1).hexdigest()
        if len(data) != length or actual != digest:
            raise ChunkCorrupt(digest, "does not match its digest (damaged)", where)
        watch.lap("verify_s")
        return data

    # ------------------------------------------------------------------ verify
    def verify(self, key: str | None = None) -> builtins.list[str]:
        problems: list[str] = []
        manifests: list[Manifest] = []
        for k, seqs in sorted(self._names(key).items()):
            for seq, names in sorted(seqs.items()):
                try:
                    manifests.append(self._load(k, names[0]))
                except (ManifestCorrupt, CheckpointNotFound, KeyMismatch) as e:
                    problems.append(f"{k!r} seq {seq}: {e}")
        problems += self._verify_manifests(manifests, set())
        return problems

    def _verify_manifests(self, manifests: builtins.list[Manifest], checked: set[str]) -> builtins.list[str]:
        problems: list[str] = []
        bad: dict[str, str] = {}
        todo: dict[str, tuple[int, str, StoreKey | None]] = {}
        for m in manifests:
            for path, ref in _refs(m):
                off, length, digest = ref[:3]
                if digest != ZERO and digest not in checked and digest not in todo:
                    length = ref[4] if len(ref) == 5 else length  # a slice: its whole chunk
                    todo[digest] = (length, f"{path} offset {off}", m.sealed_with)

        def check(digest: str) -> None:
            length, where, key = todo[digest]
            try:
                self._fetch_verified(digest, length, where, key)
            except ChunkCorrupt as e:
                bad[digest] = e.detail

        with ThreadPoolExecutor(self.workers, thread_name_prefix="revenant-verify") as pool:
            for f in [pool.submit(check, d) for d in todo]:
                f.result()
        checked.update(todo)
        for m in manifests:
            for path, ref in _refs(m):
                if ref[2] in bad:
                    problems.append(f"{m.key!r} seq {m.seq}: chunk {ref[2]} {bad[ref[2]]} ({path} offset {ref[0]})")
        return problems

    # ------------------------------------------------------------------ retention
    def delete(self, key: str, seq: int) -> None:
        names = self._names(key).get(key, {}).get(seq)
        if not names:
            raise CheckpointNotFound(f"no checkpoint {key!r} seq {seq} in {self.url}")
        for n in names:
            self.backend.retry("delete manifest", functools.partial(self.backend.delete_manifest, key, n))
        self.backend.manifests_changed(key)

    def prune(self, key: str, keep: int) -> builtins.list[int]:
        """Delete all but the newest `keep` checkpoints of key; returns the deleted seqs."""
        if keep < 1:
            raise ValueError("keep must be at least 1")
        seqs = sorted(self._committed(key), reverse=True)[keep:]
        for s in seqs:
            self.delete(key, s)
        return seqs

    def gc(self, grace_seconds: float = 3600.0) -> dict[str, Any]:
        """Delete chunks no manifest references and older than grace_seconds (mark and sweep).

        gc yields to puts, puts never wait for gc. It does not start while a live put lock exists
        ({"skipped": reason}), and before every deletion (and every pack rewrite of the file backend) it
        checks again that no put lock is live and no manifest was committed since its mark; otherwise
        it stops ({"interrupted": reason}) and leaves the rest for the next run. A put that reused a chunk
        re-checks before committing that it still exists and uploads it again if not. So a chunk a
        committed checkpoint names can only be lost if a whole put (lock write, listing, upload,
        re-check, commit) fits inside one in-flight delete request.
        """
        b = self.backend
        with HeldLock(b, f"gc-{secrets.token_hex(6)}", self.lock_stale) as lock:
            others = self._watcher.live("gc-", exclude=lock.name)
            if others:
                return {"skipped": f"another gc is running: {', '.join(others)}", "chunks_deleted": 0}
            puts = self._watcher.live("put-")
            if puts:
                return {"skipped": f"writers active: {', '.join(puts)}", "chunks_deleted": 0}
            marked = self._manifest_set()
            referenced: set[str] = set()
            manifests = 0
            unreadable = []
            for k, n in sorted(marked):
                delay_point("store.gc.mark")
                try:
                    referenced |= self._load(k, n, any_plaintext=True).chunk_digests()
                    manifests += 1
                except ManifestTooNew as e:  # a newer node's chunks: an older gc cannot tell which are live
                    return {"skipped": f"cannot read every checkpoint: {e}", "chunks_deleted": 0}
                except (ManifestCorrupt, CheckpointNotFound) as e:
                    unreadable.append(str(e))
                except KeyMismatch as e:  # its chunks are live; without its key we cannot tell which
                    return {"skipped": f"cannot read every checkpoint: {e}", "chunks_deleted": 0}
            listing = b.list_chunks()
            stats: dict[str, Any] = {
                "manifests": manifests,
                "chunks_referenced": len(referenced),
                "chunks_deleted": 0,
                "unreadable_manifests": unreadable,
            }
            if listing is None:
                stats["note"] = (
                    "this backend cannot list blobs; unreferenced blobs are removed by the "
                    "server's own garbage collection"
                )
                return stats
            cutoff = time.time() - grace_seconds
            doomed = [d for d, mtime in listing if d not in referenced and mtime < cutoff]

            def interrupted() -> str | None:
                lock.check("gc")
                puts = self._watcher.live("put-")
                if puts:
                    return f"writers active: {', '.join(puts)}"
                if self._manifest_set() - marked:
                    return "checkpoints committed since the mark"
                return None

            for digest in doomed:
                delay_point("store.gc.sweep")
                why = interrupted()
                if why:
                    stats["interrupted"] = why
                    break
                b.retry("delete chunk", functools.partial(b.delete_chunk, digest))
                stats["chunks_deleted"] += 1
                crash_point("store.gc.after-delete")

            def proceed() -> bool:
                why = stats.get("interrupted") or interrupted()
                if why:
                    stats["interrupted"] = why
                return not why

            b.finish_gc(grace_seconds, proceed)
            if "interrupted" in stats:
                log.info("gc stopped early (%s); the next run continues", stats["interrupted"])
            return stats

    def _manifest_set(self) -> set[tuple[str, str]]:
        return set(self.backend.retry("list manifests", lambda: self.backend.list_manifests(None)))


def _ref_groups(refs: builtins.list[Any]) -> builtins.list[builtins.list[Any]]:
    """A file's chunk references as units of work: each whole-chunk reference alone, and all slices of one chunk
    together at its first slice's place. A page-granular file slices a chunk of gathered changed pages at places
    spread over the whole file; one unit per chunk fetches it once, where a bounded cache would evict it between
    its slices and fetch it again."""
    out: builtins.list[builtins.list[Any]] = []
    sliced: dict[str, builtins.list[Any]] = {}
    for ref in refs:
        if len(ref) != 5:
            out.append([ref])
        elif (group := sliced.get(ref[2])) is not None:
            group.append(ref)
        else:
            sliced[ref[2]] = group = [ref]
            out.append(group)
    return out


def _end_span(span: FileSpan, _done: Future[None]) -> None:
    span.end = max(span.end, time.monotonic())


def _refs(m: Manifest) -> Iterator[tuple[str, builtins.list[Any]]]:
    """(what, reference) of every chunk reference of a manifest: its files' and its page table's."""
    for e in m.entries:
        if e["type"] == "file":
            for ref in e["chunks"]:
                yield f"file {e['path']}", ref
    if m.page_table is not None:
        for ref in m.page_table["chunks"]:
            yield "page table", ref


def _check_destination(dest: Path) -> None:
    """A restore goes into a directory that is absent or empty: never over or through anything else."""
    try:
        st = os.lstat(dest)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        raise StoreError(f"restore destination {dest} exists and is not a directory")
    if any(os.scandir(dest)):
        raise StoreError(f"restore destination {dest} is not empty")


__all__ = ["BackendUnavailable", "Store"]
