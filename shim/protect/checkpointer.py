"""Taking one protected checkpoint: freeze, dump, capture the writable layer, thaw, then upload.

The task is frozen only while CRIU dumps its memory and the writable layer is captured (both must
describe the same instant). With `stream_budget_mib` > 0 (the default) the dump streams
(shim.protect.streaming): CRIU, in a memory cgroup of the budget's size (shim.runc.memcg), writes
into on-disk scratch while a put consumes its page images, so hashing, compression and upload overlap
the dump and the shim holds about the budget of it; its page images are deduplicated page by page.
With 0 the whole dump is staged first (tmpfs, disk when it does not fit) and uploaded after the task
resumed, page images deduplicated the same way. The manifest is
committed last, so a checkpoint interrupted anywhere stays invisible and the previous one stays the
latest.

A final (exit) checkpoint must not lose the job when its upload fails: the task is dumped leaving it
running but stays frozen through upload and commit, and is stopped (SIGKILL) only once the
checkpoint is committed. If anything fails before that, the task is thawed and runs on, and the
caller gets the error: the job is either still running or restorable from a committed checkpoint.

Retention never deletes a checkpoint this container did not supersede: `keep_seqs` (the checkpoints
that existed at Create but were not used, e.g. on another image's node, or before a fresh start)
are left for an operator (`revenant store gc`).
"""

from __future__ import annotations

import logging
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from shim.checkpoint import CheckpointEngine, CheckpointOptions
from shim.progress import Meter, format_duration, format_rate
from shim.protect.policy import NodeConfig, Protection
from shim.runc.driver import Runc, RuncError
from shim.runc.memcg import DumpCgroup
from shim.store.limits import MAX_PAGE_TABLE_BYTES
from shim.store.model import PAGE as PAGE_SIZE
from shim.store.model import PAGE_HASH_LEN

from .freeze import format_breakdown, freeze_breakdown
from .image_identity import ImageIdentity, ImageLookup
from .staging import make_staging_dir, process_tree_rss, remove_staging_dir, runtime_versions
from .streaming import StreamedPut

log = logging.getLogger(__name__)

CRIU_DIR = "criu"  # CRIU images inside a checkpoint; the writable layer sits beside them
# CRIU's memory page images: the store dedups them page by page against the previous checkpoint.
PAGE_IMAGES = (f"{CRIU_DIR}/pages-*.img",)
FORMAT = "revenant.container-checkpoint.v1"
# A streamed dump's memory cgroup holds the budget (CRIU's page cache) plus runc's and CRIU's own memory
# (RSS, pipe buffers, kernel objects): measured in tests/protect/test_stream.py and bench/RESULTS.md.
DUMP_CGROUP_SLACK = 128 << 20


def streamed_page_images(expected_bytes: int) -> tuple[str, ...]:
    """The page images a streamed dump dedups page by page: all of them, unless the job is so large that
    its page table could outgrow one table's bound (a streamed put cannot fall back to FastCDC midway,
    a staged one can); half the bound leaves room for a job that grows during the dump."""
    if expected_bytes // PAGE_SIZE * PAGE_HASH_LEN > MAX_PAGE_TABLE_BYTES // 2:
        log.warning("a job of %d MiB: its streamed dump is deduplicated by FastCDC only", expected_bytes >> 20)
        return ()
    return PAGE_IMAGES


@dataclass
class ProtectedContainer:
    """What protection needs to know about one container of this shim."""

    namespace: str
    id: str
    bundle: Path
    protection: Protection
    runc: Runc
    init_pid: int = 0
    upper_dir: Path | None = None  # the rootfs overlay's upperdir; None: no writable layer to carry
    image: ImageIdentity | ImageLookup | None = None  # a lookup resolves at first use
    # Freeze the whole container if it runs; True when it paused it (a user's pause is left alone).
    pause: Callable[[], bool] | None = None
    resume: Callable[[], None] | None = None
    checkpoint_options: CheckpointOptions = field(default_factory=CheckpointOptions)
    extra_metadata: Callable[[], dict[str, Any]] | None = None  # e.g. GPU state of the dump
    keep_seqs: frozenset[int] = frozenset()  # checkpoints retention must leave alone (module docstring)
    # The key's owner epoch this container claimed in the store (fencing); 0: the store cannot fence.
    epoch: int | None = None
    owner_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


def claim_key(c: ProtectedContainer, store: Any) -> int | None:
    """Become the key's owner in the store once per container: every later put carries the epoch, and a
    node that claims after us (a restore elsewhere, after a partition) makes our puts fail with Fenced
    instead of interleaving with its checkpoints. None where the store cannot fence (a registry)."""
    with c.owner_lock:
        if c.epoch is None:
            if not store.can_fence:
                c.epoch = 0
                log.warning("%s: store %s cannot fence writers; two nodes could interleave", c.id, store.url)
            else:
                c.epoch = store.claim(c.protection.key, owner=f"{socket.gethostname()}/{c.namespace}/{c.id}")
        return c.epoch or None


@dataclass
class CheckpointReport:
    key: str
    seq: int
    bytes_read: int
    bytes_uploaded: int
    freeze_s: float
    total_s: float
    stats: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Checkpointer:
    def __init__(
        self, engine: CheckpointEngine, node: NodeConfig, open_store: Callable[[str], Any] | None = None
    ) -> None:
        self.engine = engine
        self.node = node
        if open_store is None:
            from shim.store import open_store as open_store_default

            open_store = open_store_default
        self.open_store = open_store

    def replicate_later(self, c: ProtectedContainer, seq: int) -> None:
        """Copy the committed checkpoint to the store's replicas in the background (shim.store.replication);
        the checkpoint is committed already, a replica that fails is retried and never fails it."""
        if not c.protection.replicas:
            return
        try:
            from shim.store.replication import shared_replicator

            shared_replicator(self.open_store).submit(c.protection.store, c.protection.replicas, c.protection.key, seq)
        except Exception as e:  # the checkpoint stands; `revenant store replicate` catches the replicas up
            log.error("%s seq %d: cannot queue the copy to the replicas: %s", c.protection.key, seq, e)

    def take(self, c: ProtectedContainer, *, exit: bool, reason: str) -> CheckpointReport:
        start = time.monotonic()
        expected = process_tree_rss(c.init_pid) if c.init_pid else 0
        streaming = self.node.stream_budget_mib > 0
        # A streamed dump goes to disk scratch (its backlog must never be memory); otherwise tmpfs first.
        preferred = self.node.scratch_dir if streaming else self.node.staging_dir
        staging = make_staging_dir(preferred, self.node.scratch_dir, expected, prefix=f"{c.id}-")
        # An exit checkpoint holds the task frozen until the commit (then stops it) when it can freeze
        # it; without a pause hook it falls back to CRIU stopping the task at the dump.
        hold = exit and c.pause is not None and c.resume is not None
        held = False
        memcg: dict[str, int] | None = None
        try:
            with self.open_store(c.protection.store) as store:
                if streaming:
                    epoch = claim_key(c, store)
                    budget = self.node.stream_budget_mib << 20
                    with StreamedPut(
                        store,
                        c.protection.key,
                        staging,
                        CRIU_DIR,
                        budget,
                        _progress_logger(c),
                        epoch,
                        page_patterns=streamed_page_images(expected),
                    ) as put:
                        # CRIU's dirty page cache bounded by the kernel to the budget (shim.runc.memcg).
                        cgroup = DumpCgroup.create(budget + DUMP_CGROUP_SLACK)
                        put.frozen(True)
                        try:
                            freeze_s, dump, layer, held, breakdown = self._freeze_and_dump(
                                c, staging, exit=exit, hold=hold, wrap=cgroup.wrap if cgroup else None
                            )
                        finally:
                            put.frozen(False)
                            memcg = cgroup.close().as_dict() if cgroup else None
                        metadata = self._metadata(c, reason, exit, freeze_s, dump, layer, breakdown)
                        if memcg is not None:
                            metadata["dump_memcg"] = memcg
                            log.info("dump of %s/%s in its memory cgroup: %s", c.namespace, c.id, memcg)
                        upload_start = time.monotonic()
                        info = put.finish(metadata)
                else:
                    freeze_s, dump, layer, held, breakdown = self._freeze_and_dump(c, staging, exit=exit, hold=hold)
                    metadata = self._metadata(c, reason, exit, freeze_s, dump, layer, breakdown)
                    upload_start = time.monotonic()
                    epoch = claim_key(c, store)
                    info = store.put(
                        c.protection.key,
                        staging,
                        metadata=metadata,
                        progress=_progress_logger(c),
                        epoch=epoch,
                        page_images=PAGE_IMAGES,
                    )
                pruned = prune_superseded(store, c.protection.key, c.protection.keep, c.keep_seqs)
            upload_s = time.monotonic() - upload_start
        except BaseException:
            if held:
                log.error("final checkpoint of %s/%s not committed: the task runs on", c.namespace, c.id)
                _thaw(c)
            raise
        finally:
            remove_staging_dir(staging)
        if hold:
            _stop_frozen(c)
        self.replicate_later(c, info.seq)
        total_s = time.monotonic() - start
        stats = {
            "criu": dump.as_dict(),
            "freeze": breakdown,
            "upload_s": round(upload_s, 6),  # streamed: only what was left after the thaw
            "streamed": streaming,
            "dump_memcg": memcg,
            "pruned": pruned,
            "chunks_total": info.chunks_total,
            "chunks_new": info.chunks_new,
        }
        log.info(
            "checkpoint %s seq %d of %s/%s (%s): frozen %.3fs, total %.3fs, %d bytes read, %d uploaded",
            c.protection.key,
            info.seq,
            c.namespace,
            c.id,
            reason,
            freeze_s,
            total_s,
            info.bytes_read,
            info.bytes_uploaded,
        )
        return CheckpointReport(
            c.protection.key, info.seq, info.bytes_read, info.bytes_uploaded, freeze_s, total_s, stats
        )

    def _metadata(
        self,
        c: ProtectedContainer,
        reason: str,
        exit: bool,
        freeze_s: float,
        dump: Any,
        layer: Any,
        breakdown: dict[str, float],
    ) -> dict[str, Any]:
        log.info(
            "freeze of %s/%s (%s): %s",
            c.namespace,
            c.id,
            reason,
            format_breakdown(breakdown),
            extra={"fields": {"event": "freeze_breakdown", "container": c.id, **breakdown}},
        )
        metadata = {
            "format": FORMAT,
            "container": {"namespace": c.namespace, "id": c.id},
            "image": c.image.as_dict() if c.image else None,
            "reason": reason,
            "exit": exit,
            "node": socket.gethostname(),
            "runtime": runtime_versions(),
            "criu": dump.as_dict(),
            "writable_layer": asdict(layer) if layer is not None else None,
            "freeze_s": round(freeze_s, 6),
            "freeze": breakdown,
        }
        if c.extra_metadata:
            metadata.update(c.extra_metadata())
        return metadata

    def _freeze_and_dump(
        self,
        c: ProtectedContainer,
        staging: Path,
        *,
        exit: bool,
        hold: bool,
        wrap: Callable[[list[str]], list[str]] | None = None,
    ) -> tuple[float, Any, Any, bool, dict[str, float]]:
        """Pause, dump, capture the layer, resume: the only span in which the job does not run.

        With `hold` the dump leaves the task in place and it stays frozen (the caller thaws or stops
        it); `held` says whether this call froze it. Returns (frozen seconds, dump, layer, held, the
        frozen window's breakdown, shim.protect.freeze)."""
        from shim.layer import capture_writable_layer

        options = CheckpointOptions(**{**asdict(c.checkpoint_options), "exit": exit and not hold})
        # Resolved before the freeze: a lookup still in flight would wait on containerd inside the window.
        base = c.image.base if c.image else None
        frozen_at = time.monotonic()
        gone = False
        held = False
        layer_s = resume_s = 0.0
        paused = c.pause() if c.pause is not None else False
        pause_s = time.monotonic() - frozen_at
        try:
            kw = {"wrap": wrap} if wrap is not None else {}
            dump = self.engine.checkpoint(c.runc, c.id, staging / CRIU_DIR, options, keep_log_in=c.bundle, **kw)
            gone = options.exit  # after an exit dump the task no longer exists: nothing to resume
            layer = None
            if c.upper_dir is not None:
                t = time.monotonic()
                layer = capture_writable_layer(c.upper_dir, staging, base=base, durable=False)
                layer_s = time.monotonic() - t
            held = hold and paused
        finally:
            if paused and not gone and not held and c.resume is not None:
                t = time.monotonic()
                c.resume()
                resume_s = time.monotonic() - t
        total_s = time.monotonic() - frozen_at
        breakdown = freeze_breakdown(total_s=total_s, pause_s=pause_s, dump=dump, layer_s=layer_s, resume_s=resume_s)
        return total_s, dump, layer, held, breakdown


def prune_superseded(store: Any, key: str, keep: int, keep_seqs: frozenset[int]) -> list[int]:
    """Delete all but the newest `keep` checkpoints of key, never one of `keep_seqs`; the deleted seqs.

    Runs after the commit: a failure is logged, it does not undo a committed checkpoint."""
    try:
        seqs = sorted((i.seq for i in store.list(key) if i.seq not in keep_seqs), reverse=True)
        for seq in seqs[keep:]:
            store.delete(key, seq)
        return seqs[keep:]
    except Exception as e:
        log.warning("retention of %s failed (the checkpoint is committed): %s", key, e)
        return []


def _thaw(c: ProtectedContainer) -> None:
    try:
        assert c.resume is not None
        c.resume()
    except Exception as e:  # the error that got us here matters more; this one is logged
        log.error("cannot thaw %s/%s after its failed final checkpoint: %s", c.namespace, c.id, e)


def _stop_frozen(c: ProtectedContainer) -> None:
    """Stop the task its final checkpoint holds frozen: SIGKILL, then thaw so the kill lands (a
    cgroup v1 freezer keeps even SIGKILL pending). A killed task runs no more user code."""
    try:
        c.runc.kill(c.id, signal.SIGKILL, all_processes=True)
    except RuncError as e:
        log.error("final checkpoint of %s/%s committed, but stopping the task failed: %s", c.namespace, c.id, e)
    _thaw(c)


def _progress_logger(c: ProtectedContainer) -> Callable[[int, int], None]:
    meter = Meter()
    last = [0.0]

    def report(done: int, total: int) -> None:
        """total 0: not known yet (a streamed put, while the dump runs); its first call (0, 0) says the
        upload started, later ones are logged every 2 s like a staged put's."""
        meter.update(done, total)
        now = time.monotonic()
        if now - last[0] >= 2.0 or (total > 0 and done == total) or (done, total) == (0, 0):
            last[0] = now
            snap = meter.snapshot()
            log.info(
                "uploading checkpoint of %s/%s: %d/%d MiB, %s, ETA %s",
                c.namespace,
                c.id,
                done >> 20,
                total >> 20,
                format_rate(snap.rate),
                format_duration(snap.eta),
            )

    return report
