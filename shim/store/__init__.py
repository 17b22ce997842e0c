"""Content-addressed, deduplicated, compressed and verified checkpoint store.

store = open_store("file:///var/lib/revenant/store")
info = store.put("default/mypod/main", Path("/scratch/ckpt"), metadata={...})
store.get("default/mypod/main", Path("/restore/here"))
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from .backends import open_backend
from .chunking import Chunker
from .crypto import Keyring, load_key_file
from .deferred import DeferredReader
from .errors import (
    BackendUnavailable,
    CheckpointNotFound,
    ChunkCorrupt,
    Fenced,
    KeyMismatch,
    LockLost,
    ManifestCorrupt,
    NotDeferred,
    StoreError,
)
from .model import CheckpointInfo
from .store import Store


def open_store(
    url: str, key_files: list[str | Path] | None = None, allow_plaintext: bool | None = None, **options: object
) -> Store:
    """Open the store at url; options go to Store (chunker, workers, level, lock_stale).

    key_files (or the URL's `key_file=PATH[,PATH...]`): an encrypted store; the first key seals what is
    written, every key opens what it sealed. allow_plaintext (or `allow_plaintext=1`): an encrypted store
    may also read checkpoints written without encryption (a migration).
    """
    query = {k: v[-1] for k, v in parse_qs(urlsplit(url).query).items()}
    if key_files is None and query.get("key_file"):
        key_files = [p for p in query["key_file"].split(",") if p]
    if allow_plaintext is None:
        allow_plaintext = query.get("allow_plaintext", "0") in ("1", "true", "yes")
    keyring = Keyring.from_files(list(key_files)) if key_files else None
    return Store(open_backend(url), keyring=keyring, allow_plaintext=allow_plaintext, **options)  # type: ignore[arg-type]


__all__ = [
    "BackendUnavailable",
    "CheckpointInfo",
    "CheckpointNotFound",
    "ChunkCorrupt",
    "Chunker",
    "DeferredReader",
    "Fenced",
    "KeyMismatch",
    "Keyring",
    "LockLost",
    "ManifestCorrupt",
    "NotDeferred",
    "Store",
    "StoreError",
    "load_key_file",
    "open_store",
]
