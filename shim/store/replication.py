"""Copies of checkpoints in more than one store (regions): copy, status, background catch-up, and a
reader that restores from the nearest copy. Semantics: docs/replication.md.

A checkpoint is committed when its primary store committed it; replicas follow. A copy moves the
stored objects as they are (compressed and, when encrypted, sealed: the replica needs the same key),
each chunk checked against its digest on the way, the missing chunks first and the manifest last
under the same name, so a replica never shows a checkpoint whose chunks it lacks.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import secrets
import shutil
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from ..faults import crash_point, delay_point
from .backends.base import NotFound
from .deferred import DeferredReader
from .errors import BackendUnavailable, CheckpointNotFound, ChunkCorrupt, KeyMismatch, ManifestCorrupt, StoreError
from .get_timing import GetTimings
from .locks import HeldLock
from .model import ZERO, CheckpointInfo
from .store import Progress, Store, _refs

log = logging.getLogger(__name__)
T = TypeVar("T")

# A copy that fails this way says something about that copy, not about the checkpoint: try the next.
_COPY_FAILURES = (ChunkCorrupt, ManifestCorrupt, CheckpointNotFound, BackendUnavailable)


@dataclass
class CopyResult:
    replica: str
    key: str
    seq: int
    chunks_copied: int = 0
    bytes_copied: int = 0
    chunks_present: int = 0
    already: bool = False  # the replica held this checkpoint before
    seconds: float = 0.0
    deleted: list[int] = field(default_factory=list)  # older checkpoints the primary no longer has

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def replicate(
    src: Store, dst: Store, key: str, seq: int | None = None, progress: Progress | None = None, mirror: bool = True
) -> CopyResult:
    """Copy checkpoint seq (default: the newest committed) of key from src to dst.

    mirror: also delete from dst the older checkpoints src no longer has (its retention)."""
    start = time.monotonic()
    committed = src._committed(key)
    if not committed:
        raise CheckpointNotFound(f"no committed checkpoint for {key!r} in {src.url}")
    seq = max(committed) if seq is None else seq
    if seq not in committed:
        raise CheckpointNotFound(f"no checkpoint {key!r} seq {seq} in {src.url}")
    name = committed[seq]
    result = CopyResult(dst.url, key, seq)
    there = dst._names(key).get(key, {})
    if seq in there and name not in there[seq]:
        raise StoreError(
            f"{dst.url} holds a different checkpoint {key!r} seq {seq} ({there[seq][0]}, primary: {name}): "
            "it was written there directly; not overwriting it"
        )
    if seq in there:
        result.already = True
    else:
        _copy(src, dst, key, name, result, progress)
    if mirror:
        result.deleted = _mirror_retention(dst, key, seq, set(src._committed(key)), there)
    result.seconds = time.monotonic() - start
    log.info(
        "replication of %r seq %d to %s finished in %.1fs: %d chunks copied (%d bytes), %d already there%s",
        key,
        seq,
        dst.url,
        result.seconds,
        result.chunks_copied,
        result.bytes_copied,
        result.chunks_present,
        " (it held the checkpoint already)" if result.already else "",
        extra={"fields": {"event": "replicated", **result.as_dict()}},
    )
    return result


def _copy(src: Store, dst: Store, key: str, name: str, result: CopyResult, progress: Progress | None) -> None:
    m = src._load(key, name)
    if m.sealed_with is not None:
        if dst.keyring is None or m.sealed_with.key_id_hex not in {k.key_id_hex for k in dst.keyring.keys}:
            raise KeyMismatch(
                f"{key!r} seq {m.seq} is sealed with key {m.sealed_with.key_id_hex}, which {dst.url} is not "
                "configured with: a replica must use the same key files as its primary"
            )
    elif dst.keyring is not None and not dst.allow_plaintext:
        raise KeyMismatch(f"{key!r} seq {m.seq} is not encrypted and {dst.url} reads only encrypted checkpoints")
    try:
        manifest_blob = src.backend.retry("get manifest", lambda: src.backend.get_manifest(key, name))
    except NotFound:
        raise CheckpointNotFound(f"{key!r} {name} disappeared from {src.url} (pruned concurrently?)") from None
    lengths: dict[str, int] = {}  # every chunk the checkpoint needs (files' and page table's) -> its length
    for _what, ref in _refs(m):
        if ref[2] != ZERO:
            lengths.setdefault(ref[2], ref[4] if len(ref) == 5 else ref[1])  # a slice: its whole chunk
    total = sum(lengths.values())
    done = [0]
    lock = threading.Lock()

    def copy_chunk(digest: str) -> None:
        where = f"{key!r} seq {m.seq} in {src.url}"
        blob = src._get_blob(digest, where)
        src._open_blob(digest, lengths[digest], where, m.sealed_with, blob)  # never spread damage
        dst.backend.retry(f"copy chunk {digest}", lambda: dst.backend.put_chunk(digest, blob))
        crash_point("store.replicate.after-chunk")
        with lock:
            result.chunks_copied += 1
            result.bytes_copied += len(blob)
            done[0] += lengths[digest]
            now = done[0]
        if progress:
            progress(now, total)

    def missing() -> list[str]:
        listing = dst.backend.retry("list chunks", dst._chunk_names)
        if listing is not None:
            return [d for d in lengths if d not in listing]
        return [d for d in lengths if not dst.backend.retry("check chunk", functools.partial(dst.backend.has_chunk, d))]

    # A put lock on the replica: its gc yields while chunks wait for their manifest (Store.gc).
    with HeldLock(dst.backend, f"put-repl-{secrets.token_hex(6)}", dst.lock_stale) as held:
        todo = missing()
        result.chunks_present = len(lengths) - len(todo)
        if progress:
            done[0] = sum(lengths[d] for d in lengths if d not in set(todo))
            progress(done[0], total)
        for _round in range(2):  # the second round: chunks a concurrent gc removed meanwhile
            with ThreadPoolExecutor(dst.workers, thread_name_prefix="revenant-replicate") as pool:
                for f in [pool.submit(copy_chunk, d) for d in todo]:
                    f.result()
            dst.backend.retry("flush chunks", dst.backend.flush_chunks)
            todo = missing()
            if not todo:
                break
        if todo:
            raise StoreError(f"replication of {key!r} seq {m.seq} to {dst.url}: {len(todo)} chunks keep vanishing")
        held.check(f"replicate {key!r}")
        delay_point("store.replicate.before-manifest")
        dst.backend.retry(
            "write manifest", lambda: dst.backend.put_manifest(key, name, manifest_blob, m.chunk_digests())
        )
        dst.backend.manifests_changed(key)


def _mirror_retention(dst: Store, key: str, seq: int, on_primary: set[int], before: dict[int, list[str]]) -> list[int]:
    """Delete from the replica the checkpoints older than seq that the primary pruned."""
    gone = sorted(s for s in before if s < seq and s not in on_primary)
    for s in gone:
        with contextlib.suppress(CheckpointNotFound):
            dst.delete(key, s)
    return gone


# ---------------------------------------------------------------------------------------------- status
@dataclass
class ReplicaStatus:
    replica: str
    key: str
    primary_seq: int | None
    replica_seq: int | None
    behind: int  # committed checkpoints of the primary newer than the replica's newest
    lag_s: float  # how long the replica has lacked the primary's newest (0: up to date)
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def replica_status(
    primary: Store, replicas: Sequence[Store], key: str, now: float | None = None
) -> list[ReplicaStatus]:
    """Per replica: its newest committed seq of key against the primary's, and the lag in seconds
    (time since the primary committed the oldest checkpoint the replica does not have yet)."""
    now = time.time() if now is None else now
    infos = sorted(primary.list(key), key=lambda i: i.seq)
    newest = infos[-1].seq if infos else None
    out = []
    for r in replicas:
        try:
            seqs = r._committed(key)
        except StoreError as e:
            out.append(ReplicaStatus(r.url, key, newest, None, len(infos), 0.0, f"{type(e).__name__}: {e}"))
            continue
        have = max(seqs, default=None)
        newer = [i for i in infos if have is None or i.seq > have]
        lag = max(0.0, now - newer[0].created) if newer else 0.0
        out.append(ReplicaStatus(r.url, key, newest, have, len(newer), round(lag, 3)))
    return out


# ---------------------------------------------------------------------------------------------- background
@dataclass
class _Job:
    primary: str
    replica: str
    key: str
    seq: int  # the newest committed seq it was asked for; a copy always takes the newest there is
    due: float = 0.0
    failures: int = 0


class Replicator:
    """Copies each committed checkpoint to the replicas in one background thread, newest first.

    Bounded: per (primary, replica, key) only the newest request is kept, and a copy always takes the
    primary's newest checkpoint, so a replica that fell behind skips intermediate ones. A replica that
    fails is retried with exponential backoff (up to max_backoff_s) until it answers again; nothing here
    ever blocks or fails the primary path."""

    def __init__(self, open_store: Callable[[str], Store], backoff_s: float = 1.0, max_backoff_s: float = 60.0) -> None:
        self.open_store = open_store
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self._jobs: dict[tuple[str, str, str], _Job] = {}
        self._cond = threading.Condition()
        self._busy = 0
        self._closed = False
        self._thread: threading.Thread | None = None
        self.results: list[CopyResult] = []  # the last few, newest last (status, tests)

    def submit(self, primary: str, replicas: Sequence[str], key: str, seq: int) -> None:
        with self._cond:
            for r in replicas:
                job = self._jobs.get((primary, r, key))
                if job is None:
                    self._jobs[(primary, r, key)] = _Job(primary, r, key, seq)
                elif seq > job.seq:
                    job.seq, job.due = seq, min(job.due, time.monotonic())
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="revenant-replicator", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def pending(self) -> int:
        with self._cond:
            return len(self._jobs) + self._busy

    def wait_idle(self, timeout: float) -> bool:
        """True once every submitted copy finished (within timeout seconds)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._jobs or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.5))
        return True

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def _next(self) -> _Job | None:
        with self._cond:
            while not self._closed:
                now = time.monotonic()
                due = [j for j in self._jobs.values() if j.due <= now]
                if due:
                    job = min(due, key=lambda j: j.due)
                    del self._jobs[(job.primary, job.replica, job.key)]
                    self._busy += 1
                    return job
                wait = min((j.due for j in self._jobs.values()), default=now + 3600) - now
                self._cond.wait(max(0.01, wait))
            return None

    def _run(self) -> None:
        while (job := self._next()) is not None:
            try:
                with self.open_store(job.primary) as src, self.open_store(job.replica) as dst:
                    result = replicate(src, dst, job.key)
                with self._cond:
                    self.results = [*self.results[-31:], result]
            except Exception as e:  # a replica (or the primary) that fails is retried; the checkpoint stands
                delay = min(self.max_backoff_s, self.backoff_s * 2**job.failures)
                log.warning(
                    "replication of %r to %s failed (attempt %d, retrying in %.0fs): %s: %s",
                    job.key,
                    job.replica,
                    job.failures + 1,
                    delay,
                    type(e).__name__,
                    e,
                )
                with self._cond:
                    newer = self._jobs.get((job.primary, job.replica, job.key))
                    if newer is None:
                        job.failures += 1
                        job.due = time.monotonic() + delay
                        self._jobs[(job.primary, job.replica, job.key)] = job
                    else:  # a newer request came meanwhile: keep the backoff, not the old seq
                        newer.failures = job.failures + 1
                        newer.due = time.monotonic() + delay
            finally:
                with self._cond:
                    self._busy -= 1
                    self._cond.notify_all()


_shared: dict[Any, Replicator] = {}
_shared_lock = threading.Lock()


def shared_replicator(open_store: Callable[[str], Store]) -> Replicator:
    """The process's one Replicator (per store opener): every checkpoint of this shim queues there, so
    a newer checkpoint replaces an older one still waiting, whichever container or Checkpointer took it."""
    with _shared_lock:
        rep = _shared.get(open_store)
        if rep is None:
            rep = _shared[open_store] = Replicator(open_store)
        return rep


def drain_all(timeout: float) -> bool:
    """Wait up to timeout seconds for every shared Replicator's queued copies (at shim exit)."""
    deadline = time.monotonic() + timeout
    with _shared_lock:
        reps = list(_shared.values())
    pending = sum(r.pending() for r in reps)
    if not pending:
        return True
    log.info("waiting up to %.0fs for %d replica copies before exiting", timeout, pending)
    done = all(r.wait_idle(max(0.0, deadline - time.monotonic())) for r in reps)
    if not done:
        log.warning(
            "exiting with replica copies unfinished: the next checkpoint or `revenant store replicate` copies them"
        )
    return done


# ---------------------------------------------------------------------------------------------- reading
@dataclass
class _Copy:
    store: Store
    rtt_s: float
    names: dict[int, str]  # seq -> manifest name


class Copies:
    """A primary store and its replicas read as one, for a restore: what the Restorer needs of a Store.

    list() considers every copy (the newest checkpoint may be anywhere); get() reads from the nearest
    copy that holds it (nearest: the shortest measured listing round trip, config order on ties) and
    falls back to the next when a copy turns out damaged or stops answering mid-restore. Owner epochs
    (claim, can_fence) stay on the primary. A primary that does not answer fails the listing unless
    failover is set (docs/replication.md)."""

    def __init__(self, primary: Store, replicas: Sequence[Store], failover: bool = False) -> None:
        self.primary = primary
        self.replicas = list(replicas)
        self.failover = failover
        self._copies: dict[str, list[_Copy]] = {}

    @property
    def url(self) -> str:
        return self.primary.url

    @property
    def can_fence(self) -> bool:
        return self.primary.can_fence

    def claim(self, key: str, owner: str) -> int:
        return self.primary.claim(key, owner)

    def epoch(self, key: str) -> int:
        return self.primary.epoch(key)

    def close(self) -> None:
        for s in [self.primary, *self.replicas]:
            s.close()

    def __enter__(self) -> Copies:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def order(self, key: str) -> list[Store]:
        """The copies holding key, nearest first (measured at the first call per key)."""
        return [c.store for c in self._probe(key)]

    def _probe(self, key: str) -> list[_Copy]:
        if key in self._copies:
            return self._copies[key]
        stores = [self.primary, *self.replicas]

        def timed(s: Store) -> _Copy:
            t = time.monotonic()
            names = s._committed(key)
            return _Copy(s, time.monotonic() - t, names)

        copies: list[_Copy] = []
        primary_down: StoreError | None = None
        with ThreadPoolExecutor(len(stores), thread_name_prefix="revenant-probe") as pool:
            futures = [pool.submit(timed, s) for s in stores]
            for s, f in zip(stores, futures, strict=True):
                try:
                    copies.append(f.result())
                except StoreError as e:
                    if s is self.primary and not self.failover:
                        raise
                    if s is self.primary:
                        primary_down = e
                    log.warning(
                        "%s: %s does not answer (%s); %s",
                        key,
                        s.url,
                        e,
                        "restoring from the replicas without the primary (failover)"
                        if s is self.primary
                        else "not reading from it",
                    )
        if primary_down is not None and not any(c.names for c in copies):
            # Only the primary can say "no checkpoint": a replica without one may just lag. Never a fresh start.
            raise primary_down
        primary = next((c for c in copies if c.store is self.primary), None)
        if primary is not None:  # a replica's seq under another name is not the primary's checkpoint
            for c in copies:
                for seq in [s for s, n in c.names.items() if seq_conflicts(primary.names, s, n)]:
                    log.warning("%s: %s holds another checkpoint at seq %d; ignoring it", key, c.store.url, seq)
                    del c.names[seq]
        # Stable sort: equal round trips (within a millisecond) keep config order, primary first.
        copies.sort(key=lambda c: round(c.rtt_s, 3))
        self._copies[key] = copies
        return copies

    def list(self, key: str) -> list[CheckpointInfo]:
        return sorted(self.newest_first(key), key=lambda i: i.seq)

    def newest_first(self, key: str) -> Iterator[CheckpointInfo]:
        """The checkpoints any copy holds, newest first, each manifest loaded when asked for (Store.newest_first)."""
        copies = self._probe(key)
        for seq in sorted({s for c in copies for s in c.names}, reverse=True):
            holders = [c for c in copies if seq in c.names]
            for c in holders:
                try:
                    info = c.store._load(key, c.names[seq], hand_on=True).info(c.names[seq])
                except (*_COPY_FAILURES, KeyMismatch) as e:
                    log.warning("%s seq %d: manifest on %s unusable, trying another copy: %s", key, seq, c.store.url, e)
                    continue
                yield info
                break

    def get(
        self,
        key: str,
        dest_dir: Path,
        seq: int | None = None,
        fallback: bool = False,
        progress: Progress | None = None,
        timings: GetTimings | None = None,
    ) -> CheckpointInfo:
        """Restore checkpoint seq (default: the newest any copy holds) from the nearest copy holding it.

        Every chunk is verified on the way down (Store.get); a copy that is damaged or stops answering
        leaves dest_dir as it was, and the next copy is tried. If every copy is damaged the damage is
        raised; if one only stopped answering, that outage is (its copy may be fine)."""
        return self._from_nearest(
            key,
            seq,
            timings,
            lambda store, s: store.get(key, dest_dir, seq=s, fallback=False, progress=progress, timings=timings),
        )

    def get_deferred(
        self,
        key: str,
        dest_dir: Path,
        may_defer: Callable[[str], bool],
        defer: Callable[[Path], Mapping[str, Sequence[tuple[int, int]]]],
        seq: int | None = None,
        fallback: bool = False,
        progress: Progress | None = None,
        timings: GetTimings | None = None,
        **kw: Any,
    ) -> tuple[CheckpointInfo, DeferredReader]:
        """Store.get_deferred from the nearest copy holding seq, the next copy when one is damaged or down
        before the reader is returned. The reader reads that copy only: a chunk found damaged once the job
        runs fails the job (as with one store), it is not fetched from another copy."""

        def attempt(store: Store, s: int) -> tuple[CheckpointInfo, DeferredReader]:
            try:
                return store.get_deferred(
                    key, dest_dir, may_defer, defer, seq=s, fallback=False, progress=progress, timings=timings, **kw
                )
            except BaseException:
                # A deferred chunk missing from this copy: dest holds this copy's files; the next starts afresh.
                if dest_dir.is_dir() and not dest_dir.is_symlink():
                    shutil.rmtree(dest_dir)
                    dest_dir.mkdir(mode=0o700)
                raise

        return self._from_nearest(key, seq, timings, attempt)

    def _from_nearest(
        self, key: str, seq: int | None, timings: GetTimings | None, attempt: Callable[[Store, int], T]
    ) -> T:
        """attempt(copy, seq) on the copies holding seq (default: the newest any holds), nearest first, until
        one succeeds; the outage is raised when every copy failed and one only stopped answering, else the damage."""
        copies = self._probe(key)
        if seq is None:
            seq = max((s for c in copies for s in c.names), default=None)
            if seq is None:
                raise CheckpointNotFound(f"no committed checkpoint for {key!r} in {self.url} or its replicas")
        holders = [c.store for c in copies if seq in c.names]
        if not holders:
            raise CheckpointNotFound(f"no checkpoint {key!r} seq {seq} in {self.url} or its replicas")
        damage: Exception | None = None
        outage: Exception | None = None
        for i, store in enumerate(holders):
            try:
                if timings is not None:  # only the copy that restores is measured
                    timings.reset()
                result = attempt(store, seq)
                if i:
                    log.warning("%s seq %d restored from %s after %d other copies failed", key, seq, store.url, i)
                return result
            except _COPY_FAILURES as e:
                if isinstance(e, BackendUnavailable):
                    outage = e
                else:
                    damage = e
                more = i + 1 < len(holders)
                log.warning(
                    "%s seq %d: restore from %s failed (%s: %s)%s",
                    key,
                    seq,
                    store.url,
                    type(e).__name__,
                    e,
                    f"; falling back to {holders[i + 1].url}" if more else "",
                )
        raise (outage or damage)  # type: ignore[misc]


def seq_conflicts(primary: dict[int, str], seq: int, name: str) -> bool:
    return seq in primary and primary[seq] != name


def open_copies(open_store: Callable[[str], Any], primary: str, replicas: Sequence[str], failover: bool = False) -> Any:
    """The primary store alone, or with replicas a Copies over all of them (a replica that cannot be
    opened, e.g. a bad key file, is logged and left out)."""
    store = open_store(primary)
    if not replicas:
        return store
    opened = []
    for url in replicas:
        try:
            opened.append(open_store(url))
        except Exception as e:
            log.warning("cannot open replica %s: %s", url, e)
    return Copies(store, opened, failover)


__all__ = [
    "Copies",
    "CopyResult",
    "ReplicaStatus",
    "Replicator",
    "drain_all",
    "open_copies",
    "replica_status",
    "replicate",
    "shared_replicator",
]
