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


class ManifestCorrupt(StoreError, errors.DataLoss):
    """A checkpoint manifest is truncated, unreadable or fails its digest check."""
