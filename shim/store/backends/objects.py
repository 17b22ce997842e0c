"""The part of every object-store backend (s3://, az://) that does not depend on the service.

A subclass supplies plain object operations (put/get/range/exists/list/delete under its prefix), a
create-only put (`put_if_absent`) and a listing that carries the server's clock; ObjectBackend builds the
store's layout on them: chunks (in packs, shim.store.backends.packs, or one object each), manifests,
locks with ages on the server's clock, and owner epochs.

Layout under the prefix: packs/, index/ (packs), chunks/<d[:2]>/<digest> (loose chunks),
manifests/<encoded key>/<seq>-<nonce>, locks/<name>, epochs/<encoded key>/<n>.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
from abc import abstractmethod
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from ..errors import StoreError
from ..keys import decode_key, encode_key
from ..limits import MAX_CHUNK_OBJECT, MAX_LOCK_OBJECT, MAX_MANIFEST_OBJECT
from .base import Backend, LockState, NotFound, TooLarge, TransientError
from .packs import PackStore, loose_name

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Listed:
    """One object of a listing: its name relative to the prefix, size, last-modified unix time and a tag
    that changes whenever it is rewritten (the ETag)."""

    name: str
    size: int
    modified: float
    etag: str


class ObjectBackend(Backend):
    """A Backend over a flat object store. Subclasses set `url` and `packs` and implement the object ops."""

    packs: PackStore | None = None
    _conditional: bool | None = None  # the server honours create-only puts (probed on the first claim)

    # ------------------------------------------------------------ object operations (names relative to the prefix)
    @abstractmethod
    def put_object(self, name: str, data: bytes | bytearray) -> None:
        """Store the whole object atomically (readers see all of it or the previous version)."""

    @abstractmethod
    def get_object(self, name: str, limit: int) -> bytes:
        """NotFound when absent, TooLarge (without reading it) when over limit."""

    @abstractmethod
    def get_range(self, name: str, offset: int, length: int) -> bytes:
        """Exactly length bytes at offset; NotFound when absent, Damaged when the object is shorter."""

    @abstractmethod
    def object_exists(self, name: str) -> bool: ...

    @abstractmethod
    def delete_object(self, name: str) -> None:
        """Deleting an absent object is no error."""

    @abstractmethod
    def list_pages(self, sub: str) -> Iterator[tuple[list[Listed], float | None]]:
        """Every object whose name starts with sub, a page at a time, each page with the server's clock
        (unix time from the response's Date header; None when it sent none)."""

    @abstractmethod
    def put_if_absent(self, name: str, data: bytes) -> bool:
        """Create the object only if no object has that name (If-None-Match: *): True if this call created
        it, False if one existed. A server that ignores the condition overwrites: see conditional_writes."""

    def list_objects(self, sub: str) -> Iterator[tuple[str, int, float]]:
        for page, _now in self.list_pages(sub):
            for o in page:
                yield o.name, o.size, o.modified

    def _listed(self, sub: str) -> Iterator[Listed]:
        for page, _now in self.list_pages(sub):
            yield from page

    # ------------------------------------------------------------ chunks
    def has_chunk(self, digest: str) -> bool:
        if self.packs:
            return self.packs.has_chunk(digest)
        return self.object_exists(loose_name(digest))

    def put_chunk(self, digest: str, data: bytes) -> None:
        if self.packs:
            self.packs.put_chunk(digest, data)
        else:
            self.put_object(loose_name(digest), data)

    def get_chunk(self, digest: str) -> bytes:
        if self.packs:
            return self.packs.get_chunk(digest)
        return self.get_object(loose_name(digest), MAX_CHUNK_OBJECT)

    def get_chunk_alone(self, digest: str) -> bytes:
        if self.packs:
            return self.packs.get_chunk_alone(digest)
        return self.get_chunk(digest)

    def plan_reads(self, digests: Iterable[str]) -> None:
        if self.packs:
            self.packs.plan_reads(digests)

    def delete_chunk(self, digest: str) -> None:
        if self.packs:
            self.packs.delete_chunk(digest)
        else:
            self.delete_object(loose_name(digest))

    def list_chunks(self) -> Iterator[tuple[str, float]]:
        if self.packs:
            yield from self.packs.list_chunks()
            return
        for o in self._listed("chunks/"):
            yield o.name.rsplit("/", 1)[-1], o.modified

    def flush_chunks(self) -> None:
        if self.packs:
            self.packs.flush()

    def finish_gc(self, grace_seconds: float, proceed: Callable[[], bool]) -> None:
        if self.packs:
            self.packs.finish_gc(grace_seconds, proceed)

    # ------------------------------------------------------------ manifests
    def put_manifest(self, key: str, name: str, data: bytes, chunks: set[str]) -> None:
        if self.packs:
            self.packs.check_durable(chunks)  # a pack whose upload failed must never be referenced
        self.put_object(f"manifests/{encode_key(key)}/{name}", data)

    def get_manifest(self, key: str, name: str) -> bytes:
        return self.get_object(f"manifests/{encode_key(key)}/{name}", MAX_MANIFEST_OBJECT)

    def list_manifests(self, key: str | None) -> list[tuple[str, str]]:
        sub = f"manifests/{encode_key(key)}/" if key is not None else "manifests/"
        out = []
        for o in self._listed(sub):
            parts = o.name.split("/")
            if len(parts) != 3:
                continue
            try:
                out.append((decode_key(parts[1]), parts[2]))
            except ValueError:
                log.warning("%s: skipping stray object %s", self.url, o.name[:120])
        return out

    def delete_manifest(self, key: str, name: str) -> None:
        self.delete_object(f"manifests/{encode_key(key)}/{name}")

    # ------------------------------------------------------------ owner epochs
    def conditional_writes(self) -> bool:
        """Whether the server honours create-only puts (probed once: the second create must fail)."""
        if self._conditional is None:
            probe = f"epochs/.probe-{secrets.token_hex(6)}"
            try:
                self._conditional = self.put_if_absent(probe, b"1") and not self.put_if_absent(probe, b"2")
            except TransientError:
                raise
            except StoreError:  # e.g. 400/501 for an unknown header
                self._conditional = False
            finally:
                with contextlib.suppress(StoreError):
                    self.delete_object(probe)
            if not self._conditional:
                log.warning("%s: no conditional writes; owner epochs use one name per claim", self.url)
        return bool(self._conditional)

    def create_epoch(self, key: str, n: int, data: bytes) -> bool:
        base = f"epochs/{encode_key(key)}/{n:010d}"
        if self.conditional_writes():
            return self.put_if_absent(base, data)
        # Without conditional writes: a name per claim, then a look. A claimer holds n only if it sees no
        # other claim of n after writing its own; of two racing claimers at least the later one sees the
        # other, so never both hold n; a contested n stays listed and both move on to n + 1.
        mine = f"{base}-{secrets.token_hex(6)}"
        self.put_object(mine, data)
        return [o.name for o in self._listed(base + "-")] == [mine]

    def list_epochs(self, key: str) -> list[int]:
        out = []
        for o in self._listed(f"epochs/{encode_key(key)}/"):
            n = o.name.rsplit("/", 1)[-1].partition("-")[0]
            if n.isdigit():
                out.append(int(n))
        return out

    # ------------------------------------------------------------ locks
    def put_lock(self, name: str, data: bytes) -> None:
        self.put_object(f"locks/{name}", data)

    def list_locks(self) -> list[tuple[str, bytes]]:
        out = []
        for o in self._listed("locks/"):
            name = o.name.rsplit("/", 1)[-1]
            try:
                out.append((name, self.get_object(f"locks/{name}", MAX_LOCK_OBJECT)))
            except NotFound:
                continue
            except TooLarge as e:
                log.warning("%s: skipping stray lock %s: %s", self.url, name[:80], e)
        return out

    def delete_lock(self, name: str) -> None:
        self.delete_object(f"locks/{name}")

    def lock_states(self) -> list[LockState]:
        """Ages from the server's clock alone: Last-Modified against the listing response's Date."""
        out = []
        for page, now in self.list_pages("locks/"):
            for o in page:
                name = o.name[len("locks/") :]
                if "/" in name or o.size > MAX_LOCK_OBJECT:  # not a lock this store writes
                    continue
                # Both times have one-second resolution: round the age down so a live lock never looks older.
                age = max(0.0, now - o.modified - 1.0) if now is not None else None
                out.append(LockState(name, f"{o.etag}:{o.modified}", age))
        return out

    def close(self) -> None:
        if self.packs:
            self.packs.close()


__all__ = ["Listed", "ObjectBackend"]
