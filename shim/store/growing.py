"""A put of a directory that is still being written: chunks go to the store while the producer writes.

The input is a `GrowingTree`: a directory a producer (a CRIU dump in progress) is still writing. Files
that the producer only appends to (CRIU's pages-*.img, named by `tail`) are consumed while they grow:
read in windows from the last cut, chunked exactly as a put of the finished file would chunk them (a
FastCDC cut found before a window's end does not depend on later data; the window's last, provisional
chunk is re-read with the next window), hashed, compressed and uploaded. With `page_images`, those of
them that are memory page images go through the put's page planner instead (shim.store.pages), fed
windows of whole pages as they grow: the same page-by-page dedup against the parent, and the same
manifest, as a put of the finished tree. Every other file is read once the producer says the tree is
complete, and every file's final size is taken from that moment.

Memory stays bounded whatever the dump's size:
- in flight: at most `max_inflight` chunks plus the read windows they point into;
- consumed ranges are punched out of the staged files (fallocate PUNCH_HOLE) once their chunks are
  handed to the backend, so their pages leave the page cache without being written back and their
  disk blocks are freed; the data is in the store (or in a bounded pack buffer that the commit
  flushes) and never needed again: a reused chunk that a concurrent gc removed cannot be uploaded
  again from a punched range, and the put then fails (nothing committed) instead of storing zeros;
- when the store is slower than the dump, the backlog (written, not yet consumed) spills to disk: a
  watchdog thread, independent of the consumer, starts writeback (sync_file_range) of everything
  beyond half the budget ahead of the consumer and drops it from the cache (posix_fadvise DONTNEED)
  as it becomes clean, to be read again from disk when the consumer gets there. The dirty pages the
  producer writes faster than the disk takes them are the kernel's to throttle (vm.dirty_*, or the
  memory cgroup's limit: shim.runc.memcg runs the streamed dump's CRIU in one of the budget's size).

While the producer runs with the job frozen (`set_frozen`) the workers take only idle CPU as long as
the backlog is within half the budget, so the put does not lengthen the freeze while memory allows.

Completion is never guessed: only `finish()` (the producer exited successfully) ends the growth, and
`fail()` aborts the put before anything is committed. The manifest is committed after every file is
complete and every chunk is durable, like any put.
"""

from __future__ import annotations

import logging
import os
import secrets
import stat
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shim.libc import punch_hole, start_writeback

from ..faults import crash_point
from . import chunking
from .errors import StoreError
from .keys import validate_key
from .limits import MAX_PAGE_TABLE_BYTES
from .locks import HeldLock
from .model import PAGE_HASH_LEN, ZERO, CheckpointInfo, Manifest
from .pages import PagePlanner, PlannedFile, batch_limit, matches
from .walk import scan_tree

if TYPE_CHECKING:
    from .store import Store

log = logging.getLogger(__name__)
Progress = Callable[[int, int], None]

DEFAULT_BUDGET = 512 << 20
MIN_BUDGET = 16 << 20
PAGE = 4096
PUNCH_MIN = 4 << 20  # punch in steps at least this large: each punch takes the inode lock CRIU writes under
PLAN_MIN = 1 << 20  # a growing page image is planned once this much (or a whole window) is there
POLL_S = 0.05


class TreeAborted(StoreError):
    """The producer of a growing tree failed: the put stops and commits nothing."""


class GrowingTree:
    """A directory still being written, and the producer's word on when it is complete.

    `tail(relpath)` says which files are append-only while the tree grows (safe to consume early);
    the producer calls `finish(metadata)` once every file is complete, or `fail(error)`."""

    def __init__(self, root: Path, tail: Callable[[str], bool]) -> None:
        self.root = Path(root)
        self.tail = tail
        self.metadata: dict[str, Any] = {}
        self._changed = threading.Condition()
        self._done = False
        self._error: BaseException | None = None
        self.frozen = False
        self.background = False  # what the workers follow: frozen and the backlog within bounds

    def finish(self, metadata: dict[str, Any] | None = None) -> None:
        with self._changed:
            self.metadata = dict(metadata or {})
            self._done = True
            self._changed.notify_all()

    def fail(self, error: BaseException) -> None:
        with self._changed:
            self._error = error
            self._changed.notify_all()

    def set_frozen(self, on: bool) -> None:
        """The producer runs with the job frozen (CRIU's dump): while the backlog stays within half the
        budget the put's workers take only otherwise idle CPU (SCHED_IDLE), so the dump, and with it
        the freeze, is not slowed; beyond it they compete again, since memory comes first."""
        with self._changed:
            self.frozen = on
            if not on:
                self.background = False

    def state(self) -> tuple[bool, BaseException | None]:
        with self._changed:
            return self._done, self._error

    def wait(self, timeout: float) -> None:
        with self._changed:
            if not self._done and self._error is None:
                self._changed.wait(timeout)


_sched = threading.local()


def _follow_priority(tree: GrowingTree) -> None:
    """Put the calling worker in SCHED_IDLE or back in SCHED_OTHER as the tree says (Linux: per thread).
    The reading loop itself stays at normal priority: it must see the backlog grow."""
    want = tree.background
    if getattr(_sched, "idle", False) == want:
        return
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE if want else os.SCHED_OTHER, os.sched_param(0))
        _sched.idle = want
    except (OSError, AttributeError) as e:  # not Linux, or not allowed: run at normal priority
        log.debug("cannot change the put's scheduling: %s", e)
        _sched.idle = want


class _Skipped(Exception):
    """A chunk not stored because another chunk of the same put failed first."""


class _Sink:
    """Dedup, encode and upload chunks on a pool, at most `slots` in flight (Store._upload's rules)."""

    def __init__(
        self, store: Store, pool: ThreadPoolExecutor, known: set[str], listed: bool, tree: GrowingTree
    ) -> None:
        self.store, self.pool, self.known, self.listed, self.tree = store, pool, known, listed, tree
        self.slots = threading.BoundedSemaphore(store.max_inflight)
        self.lock = threading.Lock()
        self.inflight: dict[str, threading.Lock] = {}
        self.mine: set[str] = set()
        self.reused: dict[str, tuple[Path | None, int, int]] = {}
        self.stats = {"bytes_read": 0, "bytes_uploaded": 0, "chunks_total": 0, "chunks_new": 0}
        self.abort = threading.Event()  # the first failure stops the rest quickly
        self.first_error: BaseException | None = None

    def submit(self, path: Path | None, off: int, data: bytes | memoryview, count: bool = True) -> Future[str]:
        """Store one chunk on the pool; path None: page-image data gathered by the planner, which cannot be
        read back from one place. count: a chunk of a file's FastCDC references (the planner's are
        counted from the references it resolves, as in a staged put)."""
        self.slots.acquire()
        if count:
            self.stats["bytes_read"] += len(data)
            self.stats["chunks_total"] += 1
        try:
            return self.pool.submit(self._store, path, off, data)
        except BaseException:
            self.slots.release()
            raise

    def submit_batch(self, data: bytes | memoryview, lengths: Sequence[int]) -> Future[list[str]]:
        """Store consecutive chunks of page-image data in one work item, a slot per chunk (PagePlanner)."""
        for _ in lengths:
            self.slots.acquire()
        try:
            return self.pool.submit(self._store_batch, data, lengths)
        except BaseException:
            for _ in lengths:
                self.slots.release()
            raise

    def _store_batch(self, data: bytes | memoryview, lengths: Sequence[int]) -> list[str]:
        view = memoryview(data)
        digests: list[str] = []
        pos = 0
        try:
            for n in lengths:
                digests.append(self._store(None, 0, view[pos : pos + n]))  # frees its own slot
                pos += n
        except BaseException:
            for _ in range(len(lengths) - len(digests) - 1):
                self.slots.release()
            raise
        return digests

    def _store(self, path: Path | None, off: int, data: bytes | memoryview) -> str:
        backend = self.store.backend
        _follow_priority(self.tree)
        try:
            if self.abort.is_set():
                raise _Skipped
            if chunking.is_zero(data):
                return ZERO
            digest = self.store._digest(data)
            with self.lock:
                if digest in self.known:
                    if digest not in self.mine:
                        self.reused.setdefault(digest, (path, off, len(data)))
                    return digest
                busy = self.inflight.get(digest)
                if busy is None:  # ours to upload: held until done (a plain lock: cheaper than an Event)
                    busy = self.inflight[digest] = threading.Lock()
                    busy.acquire()
                    owner = True
                else:
                    owner = False
            if not owner:
                with busy:  # another worker uploads the same chunk: wait for it
                    return digest
            uploaded = -1
            try:
                if self.listed or not backend.retry("check chunk", lambda: backend.has_chunk(digest)):
                    blob = self.store._encode_chunk(digest, data)
                    backend.retry(f"upload chunk {digest}", lambda: backend.put_chunk(digest, blob))
                    crash_point("store.put.after-chunk")
                    uploaded = len(blob)
                else:
                    uploaded = 0
            finally:
                with self.lock:
                    del self.inflight[digest]
                    if uploaded > 0:
                        self.mine.add(digest)
                        self.stats["bytes_uploaded"] += uploaded
                        self.stats["chunks_new"] += 1
                    elif uploaded == 0:
                        self.reused.setdefault(digest, (path, off, len(data)))
                    if uploaded >= 0:
                        self.known.add(digest)
                busy.release()
            return digest
        except _Skipped:
            raise
        except BaseException as e:
            with self.lock:
                if self.first_error is None:
                    self.first_error = e
            self.abort.set()
            raise
        finally:
            self.slots.release()


class _Tail:
    """One file consumed from the front: cut, submitted, and punched out once its chunks are stored.

    A page image (planned) goes through the put's page planner instead, in windows of whole pages: its
    pages are looked up in the parent's page index or copied into the planner's new-page stream, so a
    range is free to punch as soon as it is read."""

    def __init__(self, rel: str, path: Path, fd: int, window: int, planned: PlannedFile | None = None) -> None:
        self.rel, self.path, self.fd, self.window = rel, path, fd, window
        self.planned = planned
        st = os.fstat(fd)
        self.ino = (st.st_dev, st.st_ino)
        self.pos = 0  # everything before pos is cut and submitted
        self.punched = 0  # everything before punched is freed
        self.can_punch = True
        self.pending: deque[tuple[list[Any], Future[str]]] = deque()
        self.chunks: list[list[Any]] = []

    def size(self) -> int:
        return os.fstat(self.fd).st_size

    def advance(
        self, sink: _Sink, chunker: chunking.Chunker, final_size: int | None, planner: PagePlanner | None = None
    ) -> int:
        """Cut and submit what is safe to cut now (everything, with final_size); returns bytes cut."""
        start = self.pos
        size = self.size() if final_size is None else final_size
        if final_size is not None and self.size() != final_size:
            raise StoreError(f"put: {self.path} changed size after the tree was complete")
        if self.planned is not None:
            assert planner is not None
            self._plan(sink, planner, size, final_size is not None)
            return self.pos - start
        # While growing, wait for more than one maximal chunk so a real cut exists before the window's end.
        least = 1 if final_size is not None else min(self.window, 4 * chunking.MAX_CHUNKER_SIZE)
        while size - self.pos >= least and not sink.abort.is_set():
            n = min(self.window, size - self.pos)
            buf = os.pread(self.fd, n, self.pos)
            if len(buf) != n:
                raise StoreError(f"put: short read of {self.path} at {self.pos} (file truncated?)")
            view = memoryview(buf)
            reaches_end = final_size is not None and self.pos + n == final_size
            consumed = 0
            for off, length in _cuts(chunker, view, self.pos):
                if not reaches_end and off + length == n:
                    break  # provisional: the next window decides where this chunk ends
                ref: list[Any] = [self.pos + off, length, None]
                self.chunks.append(ref)
                self.pending.append((ref, sink.submit(self.path, self.pos + off, view[off : off + length])))
                consumed = off + length
            if consumed == 0:
                if n < self.window:
                    break  # no cut yet in what is there: wait for more data
                consumed = n  # pathological: no cut in a whole window
                ref = [self.pos, n, None]
                self.chunks.append(ref)
                self.pending.append((ref, sink.submit(self.path, self.pos, view)))
            self.pos += consumed
        return self.pos - start

    def _plan(self, sink: _Sink, planner: PagePlanner, size: int, final: bool) -> None:
        """Hand the planner whole pages (and, once final, the rest) read since the last call."""
        assert self.planned is not None
        window = max(self.window // PAGE * PAGE, PAGE)
        while not sink.abort.is_set():
            avail = size - self.pos
            n = min(window, avail if final else avail // PAGE * PAGE)
            if n <= 0 or (not final and n < min(window, PLAN_MIN)):
                return
            if planner.table_bytes + -(-n // PAGE) * PAGE_HASH_LEN > MAX_PAGE_TABLE_BYTES:
                raise StoreError(
                    f"put: page images beyond {MAX_PAGE_TABLE_BYTES >> 20} MiB of page table (one table's "
                    "bound); a streamed put cannot fall back to FastCDC once it started: stage this one"
                )
            buf = os.pread(self.fd, n, self.pos)
            if len(buf) != n:
                raise StoreError(f"put: short read of {self.path} at {self.pos} (file truncated?)")
            planner.add_window(self.planned, buf, self.pos)
            sink.stats["bytes_read"] += n
            self.pos += n

    def reap(self, sink: _Sink, wait: bool) -> None:
        """Collect finished chunks in file order; punch out the prefix whose chunks are all stored (a page
        image's: everything the planner read, it holds what it still needs)."""
        frontier = self.punched if self.planned is None else self.pos
        while self.pending and (wait or self.pending[0][1].done()):
            ref, fut = self.pending.popleft()
            try:
                ref[2] = fut.result()  # a failed chunk fails the put here
            except _Skipped:
                raise sink.first_error or StoreError("put aborted") from None
            frontier = ref[0] + ref[1]
        end = frontier // PAGE * PAGE
        if self.can_punch and (end - self.punched >= PUNCH_MIN or (wait and end > self.punched)):
            try:
                punch_hole(self.fd, self.punched, end - self.punched)
            except OSError as e:  # e.g. a file system without hole punching: drop clean pages instead
                log.info("cannot punch consumed ranges of %s (%s); dropping them from the cache", self.path, e)
                self.can_punch = False
            self.punched = end
        if not self.can_punch and end > 0:
            os.posix_fadvise(self.fd, 0, end, os.POSIX_FADV_DONTNEED)

    def spill(self, budget: int) -> int:
        """Backlog beyond budget: write its pages back now and drop them from the cache (read again
        from disk when the consumer gets there); returns the backlog."""
        pos = self.pos  # read racily from the watchdog: a stale value only spills a little more or less
        backlog = self.size() - pos
        if backlog > budget:
            start = (pos + budget // 2) // PAGE * PAGE
            try:
                start_writeback(self.fd, start, 0)
            except OSError as e:
                log.debug("sync_file_range on %s: %s", self.path, e)
            os.posix_fadvise(self.fd, start, 0, os.POSIX_FADV_DONTNEED)
        return backlog


class _Watchdog(threading.Thread):
    """Every POLL_S, independent of the consumer (which may wait on its workers): measure the backlog,
    spill what exceeds the budget, and let the workers yield to a frozen job only while it is small."""

    def __init__(self, tree: GrowingTree, tails: dict[str, _Tail], budget: int) -> None:
        super().__init__(name="revenant-stream-watchdog", daemon=True)
        self.tree, self.tails, self.budget = tree, tails, budget
        self.halt = threading.Event()
        self.backlog_peak = 0

    def run(self) -> None:
        while not self.halt.wait(POLL_S):
            tails = list(self.tails.values())
            if not tails:
                continue
            backlog = 0
            for t in tails:
                try:
                    backlog += t.spill(self.budget // len(tails))
                except OSError as e:  # closed meanwhile: the put is ending
                    log.debug("spill of %s: %s", t.path, e)
            self.backlog_peak = max(self.backlog_peak, backlog)
            self.tree.background = self.tree.frozen and backlog <= self.budget // 2


def _cuts(chunker: chunking.Chunker, view: memoryview, base: int) -> Any:
    """Chunk boundaries of a window starting at file offset base (fixed chunks stay on absolute multiples)."""
    if chunker.kind != "fixed":
        yield from chunker.cuts(view)
        return
    size, off, end = chunker.size, 0, len(view)
    while off < end:
        nxt = min(((base + off) // size + 1) * size - base, end)
        yield off, nxt - off
        off = nxt


def put_growing(
    store: Store,
    key: str,
    tree: GrowingTree,
    progress: Progress | None = None,
    epoch: int | None = None,
    budget: int = DEFAULT_BUDGET,
    page_images: Sequence[str] = (),
) -> CheckpointInfo:
    """Store `tree` as the next checkpoint of key while its producer still writes it (module docstring).

    page_images: glob patterns of memory page images, deduplicated page by page against the key's newest
    checkpoint as by Store.put (shim.store.pages), the same manifest as a put of the finished tree.
    Raises TreeAborted when the producer fails; nothing is committed then, nor on any other error."""
    validate_key(key)
    budget = max(budget, MIN_BUDGET)
    if epoch is not None:
        store._check_epoch(key, epoch)
    nonce = secrets.token_hex(6)
    with HeldLock(store.backend, f"put-{nonce}", store.lock_stale) as lock:
        parent, known, listed = store._dedup_base(key)
        index = store._page_index(parent, known) if page_images and parent is not None else None
        # Read windows: a fraction of the budget, since the in-flight chunks keep a few of them alive.
        window = max(min(16 << 20, max(1 << 20, budget // 16)), store.chunker.size * 16)
        with ThreadPoolExecutor(store.workers, thread_name_prefix="revenant-stream") as pool:
            sink = _Sink(store, pool, known, listed=listed, tree=tree)
            page_futures: list[Future[list[str]]] = []

            def submit_pages(data: bytes | memoryview, lengths: Sequence[int]) -> Future[list[str]]:
                fut = sink.submit_batch(data, lengths)
                page_futures.append(fut)
                return fut

            planner = (
                PagePlanner(index, store.page_chunker, submit_pages, batch_limit(store.max_inflight))
                if page_images
                else None
            )
            opener = _Opener(tree.root, window, planner, page_images)
            tails: dict[str, _Tail] = {}
            watchdog = _Watchdog(tree, tails, budget)
            watchdog.start()
            try:
                streamed = _consume(store, tree, sink, tails, opener, planner, progress)
                tree.set_frozen(False)
                entries = scan_tree(tree.root)
                for entry in entries:
                    if entry["type"] != "file":
                        continue
                    t = tails.get(entry["path"]) or opener.open(entry["path"])
                    tails[entry["path"]] = t
                    if _identity(tree.root / entry["path"]) != t.ino:
                        raise StoreError(f"put: {t.path} was replaced while the tree grew")
                    t.advance(sink, store.chunker, entry["size"], planner)
                    t.reap(sink, wait=False)
                for entry in entries:
                    if entry["type"] == "file":
                        t = tails[entry["path"]]
                        t.reap(sink, wait=True)
                        entry["chunks"] = t.chunks
                page_table = None
                if planner is not None:
                    if not sink.abort.is_set():
                        planner.finish()
                    for fut in page_futures:
                        try:
                            fut.result()
                        except _Skipped:
                            raise sink.first_error or StoreError("put aborted") from None
                    planned = {e["path"]: e for e in entries if e["type"] == "file" and tails[e["path"]].planned}
                    planner.order(list(planned))
                    page_table = store._finish_pages(
                        planner,
                        lambda data: sink.submit(None, 0, data, count=False).result(),
                        sink.mine,
                        sink.reused,
                        sink.stats,
                    )
                    for path, entry in planned.items():
                        entry["chunks"] = tails[path].planned.entry["chunks"]  # type: ignore[union-attr]
                        entry["pages"] = True
            except BaseException:
                sink.abort.set()
                raise
            finally:
                watchdog.halt.set()
                watchdog.join()
                for t in tails.values():
                    os.close(t.fd)
        stream_stats = {"streamed_bytes": streamed, "backlog_peak_bytes": watchdog.backlog_peak}
        _done, error = tree.state()
        if error is not None:
            raise TreeAborted(f"put {key!r}: the producer failed: {error}") from error
        manifest = Manifest(
            key=key,
            seq=0,
            parent=None,
            created=time.time(),
            chunker=store.describe_chunkers(bool(page_images)),
            metadata=tree.metadata,
            entries=entries,
            stats={**sink.stats, **stream_stats},
            epoch=epoch,
            page_table=page_table,
        )
        info = store._finish_put(manifest, f"put {key!r} of {tree.root}", sink.reused, nonce, lock)
    log.info(
        "streamed put %r seq %d: %d files, %d bytes read, %d uploaded (%d/%d chunks new), backlog peak %d MiB",
        key,
        info.seq,
        info.files,
        info.bytes_read,
        info.bytes_uploaded,
        info.chunks_new,
        info.chunks_total,
        stream_stats["backlog_peak_bytes"] >> 20,
    )
    return info


class _Opener:
    """Opens a file of the tree for consuming: through the page planner where it is a page image."""

    def __init__(self, root: Path, window: int, planner: PagePlanner | None, page_images: Sequence[str]) -> None:
        self.root, self.window, self.planner, self.page_images = root, window, planner, page_images

    def open(self, rel: str) -> _Tail:
        planned = None
        if self.planner is not None and matches(rel, self.page_images):
            planned = self.planner.start_file({"path": rel, "chunks": []})
        return _open_tail(self.root, rel, self.window, planned)


def _consume(
    store: Store,
    tree: GrowingTree,
    sink: _Sink,
    tails: dict[str, _Tail],
    opener: _Opener,
    planner: PagePlanner | None,
    progress: Progress | None,
) -> int:
    """Tail the append-only files until the producer is done (or failed); returns the bytes cut meanwhile."""
    streamed = 0
    if progress:
        progress(0, 0)  # the upload starts with the dump
    while True:
        done, error = tree.state()
        if error is not None:
            raise TreeAborted(f"the producer of {tree.root} failed: {error}") from error
        if done:
            return streamed
        for rel in _append_only(tree):
            if rel not in tails:
                tails[rel] = opener.open(rel)
        cut = 0
        for t in list(tails.values()):
            cut += t.advance(sink, store.chunker, None, planner)
            t.reap(sink, wait=False)
        streamed += cut
        if progress and cut:
            progress(sink.stats["bytes_read"], 0)  # the total is not known while the tree grows
        if not cut:
            tree.wait(POLL_S)


def _append_only(tree: GrowingTree) -> list[str]:
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(tree.root):
        rel_dir = os.path.relpath(dirpath, tree.root)
        for name in filenames:
            rel = name if rel_dir == "." else f"{rel_dir}/{name}"
            if tree.tail(rel):
                found.append(rel)
        dirnames.sort()
    return found


def _open_tail(root: Path, rel: str, window: int, planned: PlannedFile | None) -> _Tail:
    path = root / rel
    fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)  # RDWR: punching needs a writable fd
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise StoreError(f"put: {path} is not a regular file")
        return _Tail(rel, path, fd, window, planned)
    except BaseException:
        os.close(fd)
        raise


def _identity(path: Path) -> tuple[int, int]:
    st = os.lstat(path)
    return st.st_dev, st.st_ino
