"""Content-addressed, deduplicated, compressed and verified checkpoint store.

store = open_store("file:///var/lib/revenant/store")
info = store.put("default/mypod/main", Path("/scratch/ckpt"), metadata={...})
store.get("default/mypod/main", Path("/restore/here"))
"""

from __future__ import annotations

from .backends import open_backend
from .chunking import Chunker
from .errors import BackendUnavailable, CheckpointNotFound, ChunkCorrupt, ManifestCorrupt, StoreError
from .model import CheckpointInfo
from .store import Store


def open_store(url: str, **options: object) -> Store:
    """Open the store at url; options go to Store (chunker, workers, level, lock_stale)."""
    return Store(open_backend(url), **options)  # type: ignore[arg-type]


__all__ = [
    "BackendUnavailable",
    "CheckpointInfo",
    "CheckpointNotFound",
    "ChunkCorrupt",
    "Chunker",
    "ManifestCorrupt",
    "Store",
    "StoreError",
    "open_store",
]
