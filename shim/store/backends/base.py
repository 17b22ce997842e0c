"""The small interface every storage backend implements, and retry with backoff around it."""

from __future__ import annotations

import logging
import random
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from typing import TypeVar

from shim import errors

from ..errors import BackendUnavailable, StoreError

log = logging.getLogger(__name__)
T = TypeVar("T")


class TransientError(StoreError, errors.Unavailable):
    """A failure worth retrying (connection refused, timeout, 5xx)."""


class NotFound(StoreError, errors.NotFound):
    """The object does not exist in the backend."""


class TooLarge(StoreError, errors.DataLoss):
    """A stored object (or a server's answer) is larger than anything the store writes: not read."""


class Backend(ABC):
    """Objects of three kinds: chunks (by BLAKE3 digest), manifests (by key + name) and locks (by name).

    Chunk and manifest writes must be atomic: a reader sees the whole object or nothing.
    """

    url: str
    retries: int = 5
    backoff: float = 0.2

    # chunks
    @abstractmethod
    def has_chunk(self, digest: str) -> bool: ...
    @abstractmethod
    def put_chunk(self, digest: str, data: bytes) -> None: ...
    @abstractmethod
    def get_chunk(self, digest: str) -> bytes:
        """Raises NotFound when absent."""

    @abstractmethod
    def delete_chunk(self, digest: str) -> None: ...

    def list_chunks(self) -> Iterator[tuple[str, float]] | None:
        """(digest, last-modified unix time) of every stored chunk; None if the backend cannot list."""
        return None

    # manifests
    @abstractmethod
    def put_manifest(self, key: str, name: str, data: bytes, chunks: set[str]) -> None:
        """chunks = digests the manifest references (the OCI backend links them as layers)."""

    @abstractmethod
    def get_manifest(self, key: str, name: str) -> bytes: ...
    @abstractmethod
    def list_manifests(self, key: str | None) -> list[tuple[str, str]]:
        """(key, name) pairs."""

    @abstractmethod
    def delete_manifest(self, key: str, name: str) -> None: ...

    def finish_gc(self, grace_seconds: float) -> None:  # noqa: B027 - optional hook
        """Called at the end of a gc sweep (the file backend rewrites packs here)."""

    def manifests_changed(self, key: str) -> None:  # noqa: B027 - optional hook
        """Called after a commit or delete for key (the OCI backend repoints its `latest` tag)."""

    # locks
    @abstractmethod
    def put_lock(self, name: str, data: bytes) -> None: ...
    @abstractmethod
    def list_locks(self) -> list[tuple[str, bytes]]: ...
    @abstractmethod
    def delete_lock(self, name: str) -> None: ...

    def close(self) -> None:  # noqa: B027 - optional hook
        pass

    def retry(self, what: str, fn: Callable[[], T]) -> T:
        """Run fn, retrying TransientError with exponential backoff and jitter."""
        delay = self.backoff
        for attempt in range(1, self.retries + 1):
            try:
                return fn()
            except TransientError as e:
                if attempt == self.retries:
                    raise BackendUnavailable(f"{self.url}: {what} failed after {attempt} attempts: {e}") from e
                log.warning(
                    "%s: %s failed (attempt %d/%d, retrying in %.1fs): %s",
                    self.url,
                    what,
                    attempt,
                    self.retries,
                    delay,
                    e,
                )
                time.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, 5.0)
        raise AssertionError("unreachable")
