"""Exceptions the store raises; callers catch StoreError for anything store-related."""

from __future__ import annotations


class StoreError(Exception):
    """Any failure of the checkpoint store (bad URL, backend down, damaged data, ...)."""


class BackendUnavailable(StoreError):
    """The backend did not answer (or kept failing) after retries; nothing was committed."""


class CheckpointNotFound(StoreError):
    """No committed checkpoint matches the key (and sequence number) asked for."""


class ChunkCorrupt(StoreError):
    """A stored chunk is missing or does not match its BLAKE3 digest."""

    def __init__(self, digest: str, detail: str, where: str = "") -> None:
        self.digest = digest
        self.detail = detail
        self.where = where
        super().__init__(f"chunk {digest} {detail}" + (f" ({where})" if where else ""))


class ManifestCorrupt(StoreError):
    """A checkpoint manifest is truncated, unreadable or fails its digest check."""
