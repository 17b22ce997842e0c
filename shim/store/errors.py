"""Exceptions the store raises; callers catch StoreError for anything store-related.

Each is also the domain kind it means (shim.errors), so a server's edge answers with the right code.
"""

from __future__ import annotations

from shim import errors


class StoreError(errors.RevenantError):
    """Any failure of the checkpoint store (bad URL, backend down, damaged data, ...)."""


class BackendUnavailable(StoreError, errors.Unavailable):
    """The backend did not answer (or kept failing) after retries; nothing was committed."""


class CheckpointNotFound(StoreError, errors.NotFound):
    """No committed checkpoint matches the key (and sequence number) asked for."""


class ChunkCorrupt(StoreError, errors.DataLoss):
    """A stored chunk is missing or does not match its BLAKE3 digest."""

    def __init__(self, digest: str, detail: str, where: str = "") -> None:
        self.digest = digest
        self.detail = detail
        self.where = where
        super().__init__(f"chunk {digest} {detail}" + (f" ({where})" if where else ""))


class NotDeferred(StoreError, errors.OutOfRange):
    """A lazy-restore read outside the checkpoint's deferred ranges (shim.store.deferred): refused."""


class ManifestCorrupt(StoreError, errors.DataLoss):
    """A checkpoint manifest is truncated, unreadable or fails its digest check."""


class ManifestTooNew(ManifestCorrupt):
    """A manifest in a format newer than this revenant knows: written by a newer node, not damage."""


class LockLost(StoreError):
    """The operation's lock lapsed (not refreshed within the stale time); it stopped before committing."""


class Fenced(StoreError):
    """A newer owner claimed the key: this writer's epoch is out of date and its put was refused."""

    def __init__(self, key: str, epoch: int, current: int) -> None:
        self.key, self.epoch, self.current = key, epoch, current
        super().__init__(f"put {key!r} refused: epoch {epoch} is fenced, the key's current epoch is {current}")


class KeyMismatch(StoreError):
    """The data is encrypted with a key this store does not have (or is not encrypted when it must be)."""
