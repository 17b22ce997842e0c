"""Choosing and preparing the checkpoint a re-created container restores from.

Candidates are the key's committed checkpoints, newest first. One is usable when it was taken on the
same image (digest and rootfs base), every chunk verifies on the way down, and its writable layer
applies cleanly. A damaged or mismatched checkpoint is skipped with the reason recorded, so the
container either restores from the newest usable one or starts fresh with every reason logged.

Only "no usable checkpoint" starts fresh. A store that does not answer, refused credentials, or a
local disk that is full or failing (RestoreUnavailable) say nothing about the checkpoints: Create
fails with the reason and is retried, so an outage never quietly restarts a job from zero.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shim.protect.policy import Protection

from .checkpointer import CRIU_DIR
from .image_identity import ImageIdentity, ImageLookup
from .restore_breakdown import PrepareTimings
from .staging import HEADROOM, owned_name, secure_root

log = logging.getLogger(__name__)

PAGES_IMAGE = re.compile(re.escape(CRIU_DIR) + r"/pages-\d+\.img")

# Local errors that say this node cannot hold the checkpoint now, not that the checkpoint is bad.
LOCAL_OUTAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.ENOMEM, errno.EMFILE})


class RestoreUnavailable(Exception):
    """The checkpoints could not be read (store outage, credentials, full or failing local disk)."""


class _ImageMismatch(Exception):
    """A fetched checkpoint turned out to be taken on another image than the container's."""


def _image_mismatch(image: ImageIdentity | ImageLookup | None, metadata: dict[str, Any]) -> str | None:
    """Why the checkpoint does not fit the container's image, or None; waits for containerd's answer."""
    if isinstance(image, ImageLookup) and image.result() is None:
        # containerd could not say which image this is: an outage, not a reason to restore unchecked
        raise RestoreUnavailable("cannot ask containerd which image the container runs (see the log)")
    return image.differs_from(metadata.get("image")) if image else None


def _is_damage(e: BaseException) -> bool:
    """True when the error is about the checkpoint itself (skip it), False for an outage (fail Create)."""
    from shim.store import BackendUnavailable, CheckpointNotFound, ChunkCorrupt, ManifestCorrupt, StoreError

    if isinstance(e, (ChunkCorrupt, ManifestCorrupt, CheckpointNotFound)):
        return True
    if isinstance(e, StoreError) and not isinstance(e, BackendUnavailable) and isinstance(e.__cause__, OSError):
        return _is_damage(e.__cause__)  # the store wraps a local error of the restore: judge that error
    if isinstance(e, (BackendUnavailable, StoreError)):
        return False  # unreachable, refused (403) or unable to write: nothing learnt about the data
    if isinstance(e, OSError):
        return e.errno not in LOCAL_OUTAGE_ERRNOS
    return True  # ValueError and the layer applier's own errors: a checkpoint this shim cannot use


@dataclass
class RestorePlan:
    key: str
    seq: int
    criu_dir: Path
    scratch: Path  # holds criu_dir; removed by discard()
    metadata: dict[str, Any]
    skipped: list[str] = field(default_factory=list)  # why newer checkpoints were not used
    unused_seqs: list[int] = field(default_factory=list)  # newer checkpoints skipped here (kept by prune)
    timings: PrepareTimings = field(default_factory=PrepareTimings)  # where prepare's time went
    # A lazy restore's plan: the pages files in criu_dir lack these ranges, read through this reader
    # (shim.store.deferred) from the still open store, until discard() closes both.
    deferred: Any = None
    store: Any = None

    def discard(self) -> None:
        """Close the lazy reader and its store, remove the scratch dir; a second call does nothing."""
        deferred, store, self.deferred, self.store = self.deferred, self.store, None, None
        for closing in (deferred, store):
            if closing is not None:
                try:
                    closing.close()
                except Exception as e:  # a store that will not close cleanly loses nothing here
                    log.warning("closing the lazy restore's %s: %s", type(closing).__name__, e)
        shutil.rmtree(self.scratch, ignore_errors=True)

    def read(self, name: str, offset: int, length: int) -> bytes:
        """Verified bytes of a lazy range of the pages file criu_dir/name: the plan is the PageSource of
        its lazy restore (shim.checkpoint.page_server)."""
        deferred = self.deferred
        if deferred is None:
            raise RuntimeError(f"the lazy restore of {self.key}@{self.seq} has ended")
        return deferred.read(f"{CRIU_DIR}/{name}", offset, length)

    def job_running(self) -> None:
        """The restored job runs: start filling the rest of its memory in the background. Not before: on a
        small node the fill's fetching and verifying would slow the layer, runc and CRIU the job waits for;
        until now a page asked for is fetched by itself."""
        deferred = self.deferred
        if deferred is not None:
            deferred.start_fill()


@dataclass
class NoUsableCheckpoint:
    key: str
    reasons: list[str]
    unused_seqs: list[int] = field(default_factory=list)  # checkpoints that exist but were not usable here

    def __str__(self) -> str:
        if not self.reasons:
            return f"no checkpoint of {self.key}: starting fresh"
        return f"no usable checkpoint of {self.key}, starting fresh: " + "; ".join(self.reasons)


class Restorer:
    def __init__(self, open_store: Callable[[str], Any] | None = None) -> None:
        if open_store is None:
            from shim.store import open_store as open_store_default

            open_store = open_store_default
        self.open_store = open_store

    def prepare(
        self,
        protection: Protection,
        scratch_base: Path,
        upper_dir: Path | None,
        image: ImageIdentity | ImageLookup | None,
        skip_seqs: Iterable[int] = (),
        compatible: Callable[[dict[str, Any]], str | None] | None = None,
        fill: Callable[[Path, Path], object] | None = None,
        claim: Callable[[Any], object] | None = None,
        lazy: bool = False,
    ) -> RestorePlan | NoUsableCheckpoint:
        """Fetch and verify the newest usable checkpoint and fill `upper_dir` (empty) from its layer.

        `compatible(metadata)` may refuse a checkpoint this node cannot take (its GPUs differ) with
        the reason; such a checkpoint is skipped like one taken on another image. `fill(checkpoint_dir,
        upper_dir)` replaces fill_upper_dir (the caller may need to unmount the overlay around it).
        `claim(store)` takes the key's owner epoch before the checkpoints are listed: an old owner cut off
        by a partition cannot then commit a newer checkpoint than the one this restore picks.
        `lazy`: leave the lazy pages of a CPU-only checkpoint in the store, for a lazy restore (the plan
        then holds the open store and a reader of them; shim.checkpoint.lazy_restore)."""
        reasons: list[str] = []
        unused: list[int] = []
        skip = set(skip_seqs)
        from shim.store.get_timing import GetTimings

        timings = PrepareTimings()
        began = time.monotonic()
        try:
            opened = _open_copies(self.open_store, protection)
        except Exception as e:  # e.g. the node's key file unreadable: nothing learnt about the checkpoints
            raise RestoreUnavailable(f"cannot open the store of {protection.key}: {e}") from None
        timings.open_s = time.monotonic() - began
        handed_over = False  # a lazy plan keeps the store open until its pages are all read
        with contextlib.ExitStack() as closing:
            closing.callback(lambda: handed_over or opened.close())
            store = opened
            if claim is not None:
                try:
                    claim(store)
                except Exception as e:  # e.g. the store is down: listing fails below, or the task claims later
                    log.warning("%s: cannot claim the key before restoring: %s", protection.key, e)
            timings.claim_s = time.monotonic() - began - timings.open_s
            listed = time.monotonic()
            for info in _newest_first(store, protection.key):
                if not timings.list_s:  # the listing and the newest manifest; older ones load only if needed
                    timings.list_s = time.monotonic() - listed
                if info.seq in skip:
                    continue
                where = f"{protection.key}@{info.seq}"
                # containerd's answer about the image (asked in a child process) may still be on its way:
                # the fetch starts without it and the image is checked once the fetch is done, before the
                # checkpoint is used at all (layer, plan). A mismatch then costs a wasted fetch, never a
                # wrong restore.
                late = isinstance(image, ImageLookup) and not image.done()
                mismatch = None if late else _image_mismatch(image, info.metadata)
                if not mismatch and compatible is not None:
                    mismatch = compatible(info.metadata)
                if mismatch:
                    reasons.append(f"{where}: {mismatch}")
                    unused.append(info.seq)
                    continue
                scratch = _scratch_for(scratch_base, info.bytes_read, where)
                fetch = GetTimings()
                fetch_began = time.monotonic()
                layer_s = image_s = 0.0
                deferred = None
                try:
                    if lazy and hasattr(store, "get_deferred") and not info.metadata.get("gpu"):
                        _, deferred = store.get_deferred(
                            protection.key,
                            scratch,
                            may_defer=_is_pages_image,
                            defer=_lazy_ranges,
                            seq=info.seq,
                            fallback=False,
                            timings=fetch,
                            fill_later=True,  # RestorePlan.job_running starts it
                        )
                        if not deferred.ranges:  # not eligible: every byte was fetched
                            deferred.close()
                            deferred = None
                    else:
                        store.get(protection.key, scratch, seq=info.seq, fallback=False, timings=fetch)
                    fetched = time.monotonic()
                    if late:
                        mismatch = _image_mismatch(image, info.metadata)
                        image_s = time.monotonic() - fetched
                        fetched = time.monotonic()
                        if mismatch:
                            raise _ImageMismatch(mismatch)
                    if not (scratch / CRIU_DIR).is_dir():
                        raise ValueError(f"checkpoint holds no {CRIU_DIR}/ directory of CRIU images")
                    if upper_dir is not None:
                        (fill or fill_upper_dir)(scratch, upper_dir)
                    layer_s = time.monotonic() - fetched
                except (_ImageMismatch, RestoreUnavailable) as e:
                    _close(deferred)
                    shutil.rmtree(scratch, ignore_errors=True)
                    if isinstance(e, RestoreUnavailable):
                        raise
                    timings.skipped_s += time.monotonic() - fetch_began - image_s
                    reasons.append(f"{where}: {e}")
                    unused.append(info.seq)
                    continue
                except Exception as e:
                    _close(deferred)
                    shutil.rmtree(scratch, ignore_errors=True)
                    timings.skipped_s += time.monotonic() - fetch_began
                    if not _is_damage(e):
                        raise RestoreUnavailable(f"cannot fetch {where}: {type(e).__name__}: {e}") from None
                    detail = (
                        str(e) if isinstance(e, (ValueError, OSError)) or _is_store_error(e) else f"writable layer: {e}"
                    )
                    reasons.append(f"{where}: {detail}")
                    unused.append(info.seq)
                    log.warning("checkpoint %s is not usable, trying an older one: %s", where, detail)
                    continue
                timings.fetch_s, timings.image_s = fetched - fetch_began - image_s, image_s
                timings.layer_s, timings.fetch = layer_s, fetch.as_dict()
                timings.total_s = time.monotonic() - began
                plan = RestorePlan(
                    protection.key, info.seq, scratch / CRIU_DIR, scratch, info.metadata, reasons, unused, timings
                )
                if deferred is not None:
                    plan.deferred, plan.store, handed_over = deferred, store, True
                return plan
        return NoUsableCheckpoint(protection.key, reasons, unused)


def _newest_first(store: Any, key: str) -> Iterator[Any]:
    """The key's checkpoints newest first, each manifest loaded only when the previous one was not used;
    a store that stops answering meanwhile is an outage (RestoreUnavailable), as at the first listing."""
    candidates = store.newest_first(key)
    while True:
        try:
            info = next(candidates)
        except StopIteration:
            return
        except Exception as e:
            if _is_damage(e):
                raise
            raise RestoreUnavailable(f"cannot list the checkpoints of {key}: {e}") from None
        yield info


def _is_pages_image(path: str) -> bool:
    """A CRIU pages file of the checkpoint: the only files a lazy restore may leave in the store."""
    return PAGES_IMAGE.fullmatch(path) is not None


def _lazy_ranges(root: Path) -> dict[str, list[tuple[int, int]]]:
    """What a lazy restore leaves in the store, read from the fetched pagemaps: nothing when the
    checkpoint cannot be restored lazily (its pages in a parent, no lazy pages at all)."""
    from shim.checkpoint.lazy_pages import NotLazyEligible, lazy_ranges

    try:
        ranges = lazy_ranges(root / CRIU_DIR)
    except NotLazyEligible as e:
        log.info("restoring eagerly: %s", e)
        return {}
    return {f"{CRIU_DIR}/{name}": spans for name, spans in ranges.items()}


def _close(deferred: Any) -> None:
    if deferred is not None:
        deferred.close()


def _open_copies(open_store: Callable[[str], Any], protection: Protection) -> Any:
    """The protection's store, or with replicas all its copies read as one (shim.store.replication)."""
    if not protection.replicas:
        return open_store(protection.store)
    from shim.store.replication import open_copies

    return open_copies(open_store, protection.store, protection.replicas, protection.failover)


def _is_store_error(e: BaseException) -> bool:
    from shim.store import StoreError

    return isinstance(e, StoreError)


def _scratch_for(base: Path, expected_bytes: int, where: str) -> Path:
    """A fresh directory for one fetched checkpoint, after checking `base` has room for it."""
    try:
        free = shutil.disk_usage(secure_root(base)).free
        if free < expected_bytes * HEADROOM:
            raise OSError(
                errno.ENOSPC,
                f"restore scratch {base} has {free >> 20} MiB free, {where} needs about "
                f"{int(expected_bytes * HEADROOM) >> 20} MiB (set scratch_dir in the node config)",
            )
        return Path(tempfile.mkdtemp(prefix=owned_name("restore-"), dir=base))
    except OSError as e:
        raise RestoreUnavailable(str(e)) from None


def fill_upper_dir(checkpoint_dir: Path, upper_dir: Path) -> dict[str, int] | None:
    """Apply the checkpoint's writable layer to the container's upper dir, all or nothing.

    The layer is built in a sibling directory and renamed over the (empty) upper dir in one step, so
    a failure leaves the upper dir as empty as it was.
    """
    from shim.layer import LAYER_FILE, apply_writable_layer, fill_empty_upper_dir, verify_layer

    if not list(checkpoint_dir.rglob(LAYER_FILE)):
        return None  # checkpoint taken without a writable layer (e.g. a read-only rootfs)
    tar_path = verify_layer(checkpoint_dir)
    return fill_empty_upper_dir(upper_dir, lambda filled: apply_writable_layer(tar_path, filled))


def clear_upper_dir(upper_dir: Path) -> None:
    """Empty an upper dir (only while its overlay is not mounted) before a fallback restore."""
    for entry in upper_dir.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
