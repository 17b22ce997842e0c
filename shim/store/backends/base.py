"""The small interface every storage backend implements, and retry with backoff around it."""

from __future__ import annotations

import logging
import random
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import blake3

from shim import errors

from ..errors import BackendUnavailable, StoreError

log = logging.getLogger(__name__)
T = TypeVar("T")


class TransientError(StoreError, errors.Unavailable):
    """A failure worth retrying (connection refused, timeout, 5xx)."""


class NotFound(StoreError, errors.NotFound):
    """The object does not exist in the backend."""


@dataclass(frozen=True)
class LockState:
    name: str
    fingerprint: str  # changes whenever the lock object is rewritten
    age: float | None  # seconds since it was last written, on the backend's own clock; None: unknown


class TooLarge(StoreError, errors.DataLoss):
    """A stored object (or a server's answer) is larger than anything the store writes: not read."""


class Damaged(StoreError, errors.DataLoss):
    """A stored object is not what the store wrote (a pack shorter than its index says, a bad trailer)."""


class Backend(ABC):
    """Objects of three kinds: chunks (by BLAKE3 digest), manifests (by key + name) and locks (by name).

    Chunk and manifest writes must be atomic: a reader sees the whole object or nothing.
    """

    url: str
    retries: int = 5
    backoff: float = 0.2

    # chunks
    @abstractmethod
    def has_chunk(self, digest: str) -> bool:
        """Whether the chunk is stored, including by other writers since this backend was opened (a pack
        store reloads its indexes on a miss). oci:// answers from the index it built once per process."""

    @abstractmethod
    def put_chunk(self, digest: str, data: bytes) -> None: ...
    @abstractmethod
    def get_chunk(self, digest: str) -> bytes:
        """Raises NotFound when absent."""

    def get_chunk_alone(self, digest: str) -> bytes:
        """A chunk asked for out of any planned order (a lazy restore's page fault): packed backends fetch
        it by itself rather than the read window around it. Raises NotFound when absent."""
        return self.get_chunk(digest)

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

    def finish_gc(self, grace_seconds: float, proceed: Callable[[], bool]) -> None:  # noqa: B027 - optional hook
        """Called at the end of a gc sweep (the file backend rewrites packs here); proceed() is asked
        right before each step that removes data, and False means stop there."""

    def plan_reads(self, digests: Iterable[str]) -> None:  # noqa: B027 - optional hook
        """The chunks a restore is about to get, in its order (packed backends fetch ahead)."""

    def manifests_changed(self, key: str) -> None:  # noqa: B027 - optional hook
        """Called after a commit or delete for key (the OCI backend repoints its `latest` tag)."""

    # locks
    @abstractmethod
    def put_lock(self, name: str, data: bytes) -> None: ...
    @abstractmethod
    def list_locks(self) -> list[tuple[str, bytes]]: ...
    @abstractmethod
    def delete_lock(self, name: str) -> None: ...

    def lock_states(self) -> list[LockState]:
        """Every lock with a fingerprint that changes on each rewrite and, where the backend can tell,
        its age on the backend's own clock. The default knows no ages: liveness is then judged by
        watching fingerprints."""
        return [LockState(name, blake3.blake3(body).hexdigest(), None) for name, body in self.list_locks()]

    def flush_chunks(self) -> None:  # noqa: B027 - optional hook
        """Make every chunk put so far durable and visible (the file and S3 backends seal and index their packs
        here)."""

    # owner epochs (fencing)
    def create_epoch(self, key: str, n: int, data: bytes) -> bool:
        """Create epoch n of key only if it does not exist yet (atomically): True if this call created it."""
        raise StoreError(
            f"{self.url}: this backend cannot fence writers (owner epochs need file://, s3://, az:// or gs://)"
        )

    def list_epochs(self, key: str) -> list[int]:
        """The epochs created for key."""
        raise StoreError(
            f"{self.url}: this backend cannot fence writers (owner epochs need file://, s3://, az:// or gs://)"
        )

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
