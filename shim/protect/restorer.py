"""Choosing and preparing the checkpoint a re-created container restores from.

Candidates are the key's committed checkpoints, newest first. One is usable when it was taken on the
same image (digest and rootfs base), every chunk verifies on the way down, and its writable layer
applies cleanly. A damaged or mismatched checkpoint is skipped with the reason recorded, so the
container either restores from the newest usable one or starts fresh with every reason logged.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shim.protect.policy import Protection

from .checkpointer import CRIU_DIR
from .image_identity import ImageIdentity, ImageLookup

log = logging.getLogger(__name__)


@dataclass
class RestorePlan:
    key: str
    seq: int
    criu_dir: Path
    scratch: Path  # holds criu_dir; removed by discard()
    metadata: dict[str, Any]
    skipped: list[str] = field(default_factory=list)  # why newer checkpoints were not used

    def discard(self) -> None:
        shutil.rmtree(self.scratch, ignore_errors=True)


@dataclass
class NoUsableCheckpoint:
    key: str
    reasons: list[str]

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
    ) -> RestorePlan | NoUsableCheckpoint:
        """Fetch and verify the newest usable checkpoint and fill `upper_dir` (empty) from its layer.

        `compatible(metadata)` may refuse a checkpoint this node cannot take (its GPUs differ) with
        the reason; such a checkpoint is skipped like one taken on another image. `fill(checkpoint_dir,
        upper_dir)` replaces fill_upper_dir (the caller may need to unmount the overlay around it)."""
        from shim.store import StoreError

        reasons: list[str] = []
        skip = set(skip_seqs)
        with self.open_store(protection.store) as store:
            try:
                candidates = sorted(store.list(protection.key), key=lambda i: i.seq, reverse=True)
            except StoreError as e:
                return NoUsableCheckpoint(protection.key, [f"store {protection.store} unavailable: {e}"])
            for info in candidates:
                if info.seq in skip:
                    continue
                where = f"{protection.key}@{info.seq}"
                mismatch = image.differs_from(info.metadata.get("image")) if image else None
                if not mismatch and compatible is not None:
                    mismatch = compatible(info.metadata)
                if mismatch:
                    reasons.append(f"{where}: {mismatch}")
                    continue
                scratch = Path(tempfile.mkdtemp(prefix=".revenant-restore-", dir=scratch_base))
                try:
                    store.get(protection.key, scratch, seq=info.seq, fallback=False)
                    if not (scratch / CRIU_DIR).is_dir():
                        raise ValueError(f"checkpoint holds no {CRIU_DIR}/ directory of CRIU images")
                    if upper_dir is not None:
                        (fill or fill_upper_dir)(scratch, upper_dir)
                except (StoreError, ValueError, OSError) as e:
                    shutil.rmtree(scratch, ignore_errors=True)
                    reasons.append(f"{where}: {e}")
                    log.warning("checkpoint %s is not usable, trying an older one: %s", where, e)
                    continue
                except Exception as e:  # the layer applier's own errors (hostile or damaged diff)
                    shutil.rmtree(scratch, ignore_errors=True)
                    reasons.append(f"{where}: writable layer: {e}")
                    log.warning("checkpoint %s has an unusable writable layer: %s", where, e)
                    continue
                return RestorePlan(protection.key, info.seq, scratch / CRIU_DIR, scratch, info.metadata, reasons)
        return NoUsableCheckpoint(protection.key, reasons)


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
