"""Taking one protected checkpoint: freeze, dump, capture the writable layer, thaw, then upload.

The task is frozen only while CRIU dumps its memory into memory-backed staging and the writable
layer is captured (both must describe the same instant); hashing, compression and upload run after
it resumed. The manifest is committed last, so a checkpoint interrupted anywhere stays invisible and
the previous one stays the latest.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from shim.checkpoint import CheckpointEngine, CheckpointOptions
from shim.protect.policy import NodeConfig, Protection
from shim.runc.driver import Runc

from .image_identity import ImageIdentity, ImageLookup
from .staging import make_staging_dir, process_tree_rss, remove_staging_dir, runtime_versions

log = logging.getLogger(__name__)

CRIU_DIR = "criu"  # CRIU images inside a checkpoint; the writable layer sits beside them
FORMAT = "revenant.container-checkpoint.v1"


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

    def take(self, c: ProtectedContainer, *, exit: bool, reason: str) -> CheckpointReport:
        start = time.monotonic()
        expected = process_tree_rss(c.init_pid) if c.init_pid else 0
        staging = make_staging_dir(self.node.staging_dir, c.bundle, expected, prefix=f"{c.id}-")
        try:
            freeze_s, dump, layer = self._freeze_and_dump(c, staging, exit=exit)
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
            }
            if c.extra_metadata:
                metadata.update(c.extra_metadata())
            upload_start = time.monotonic()
            with self.open_store(c.protection.store) as store:
                info = store.put(c.protection.key, staging, metadata=metadata, progress=_progress_logger(c))
                pruned = store.prune(c.protection.key, c.protection.keep)
            upload_s = time.monotonic() - upload_start
        finally:
            remove_staging_dir(staging)
        total_s = time.monotonic() - start
        stats = {
            "criu": dump.as_dict(),
            "upload_s": round(upload_s, 6),
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

    def _freeze_and_dump(self, c: ProtectedContainer, staging: Path, *, exit: bool) -> tuple[float, Any, Any]:
        """Pause, dump, capture the layer, resume: the only span in which the job does not run."""
        from shim.layer import capture_writable_layer

        options = CheckpointOptions(**{**asdict(c.checkpoint_options), "exit": exit})
        frozen_at = time.monotonic()
        gone = False
        paused = c.pause() if c.pause is not None else False
        try:
            dump = self.engine.checkpoint(c.runc, c.id, staging / CRIU_DIR, options, keep_log_in=c.bundle)
            gone = exit  # after an exit dump the task no longer exists: nothing to resume
            layer = None
            if c.upper_dir is not None:
                layer = capture_writable_layer(c.upper_dir, staging, base=c.image.base if c.image else None)
        finally:
            if paused and not gone and c.resume is not None:
                c.resume()
        return time.monotonic() - frozen_at, dump, layer


def _progress_logger(c: ProtectedContainer) -> Callable[[int, int], None]:
    last = [0.0]

    def report(done: int, total: int) -> None:
        now = time.monotonic()
        if now - last[0] >= 2.0 or done == total:
            last[0] = now
            log.info("uploading checkpoint of %s/%s: %d/%d MiB", c.namespace, c.id, done >> 20, total >> 20)

    return report
