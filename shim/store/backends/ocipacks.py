"""Packs in a registry: the oci:// chunk layer, many chunks per blob, a small manifest at any size.

A registry has no named objects and no blob listing: blobs are named by sha256 and kept alive only by the
manifests that reference them. So the pack layer of shim.store.backends.packs is used without its index/
objects: PackWriter builds packs in the same format (chunk blobs, then a trailer) and uploads them in the
background as blobs; each checkpoint's OCI manifest then lists

  the revenant manifest, one pack-index blob, one layer per pack the checkpoint uses (packs of earlier
  checkpoints it still references are listed again, so registry GC keeps them), and a layer per chunk for
  chunks stored one blob each (stores written before packs, annotated with their BLAKE3 name).

The pack-index blob is packs.encode_index over the manifest's pack layers in layer order, each with every
entry of its pack's trailer, the pack named by the first 16 bytes of its sha256: it is a function of the
packs alone, so a lost or damaged one is rebuilt from the pack trailers byte for byte and pushed again.

Durability: a pack is referenced only by a manifest written after flush() saw its upload complete; a
manifest naming a chunk not known to be in a stored pack (or a loose blob) is refused (check in
OCIBackend.put_manifest), so a failed background upload is never referenced and a crash mid-pack leaves
only unreferenced blobs, which the registry's garbage collection reclaims. Nothing here deletes a pack: a
pack lives while any manifest lists it (no repack; dead chunks of a still-listed pack stay stored).

Everything read back is bounded (shim.store.limits) and checked: layer sizes, the index blob's digest and
entries, trailers; a chunk's bytes are verified against its BLAKE3 digest by the Store.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

from ..errors import StoreError
from ..limits import MAX_INDEX_OBJECT, MAX_PACK_OBJECT
from .base import Damaged, NotFound, TooLarge
from .packs import FOOTER, Entry, PackWriter, _Windows, decode_index, encode_index, read_trailer

if TYPE_CHECKING:
    from .oci import OCIBackend

log = logging.getLogger(__name__)
T = TypeVar("T")

PACK_MT = "application/vnd.revenant.pack.v1"
PACK_INDEX_MT = "application/vnd.revenant.pack-index.v1"
_SHA = re.compile(r"sha256:([0-9a-f]{64})")
_PACK_NAME = re.compile(r"packs/[0-9a-f]{2}/([0-9a-f]{32}|[0-9a-f]{64})")


class RegistryBlobs:
    """packs.ObjectStore over registry blobs, for PackWriter and the windowed reader.

    put_object("packs/xx/<id>") uploads a pack blob and remembers id -> (sha256, size) for flush();
    get_range("packs/xx/<sha256 hex>") is a ranged GET of that blob. Registries cannot list or delete by
    name, so the other ObjectStore methods refuse (the pack layer here never calls them)."""

    def __init__(self, backend: OCIBackend) -> None:
        self.backend = backend
        self.url = backend.url
        self._lock = threading.Lock()
        self.stored: dict[str, tuple[str, int]] = {}  # writer's pack id -> (sha256 hex, size)
        self.sizes: dict[str, int] = {}  # sha256 hex -> pack size (bounds a whole-blob fallback read)

    def retry(self, what: str, fn: Callable[[], T]) -> T:
        return self.backend.retry(what, fn)

    @staticmethod
    def _id(name: str) -> str:
        m = _PACK_NAME.fullmatch(name)
        if m is None:
            raise StoreError(f"a registry store holds only packs as blobs, not {name[:120]!r}")
        return m.group(1)

    def put_object(self, name: str, data: bytes | bytearray) -> None:
        pack = self._id(name)
        sha = self.backend.upload_blob(data, probe=False)
        with self._lock:
            self.stored[pack] = (sha.removeprefix("sha256:"), len(data))
            self.sizes[sha.removeprefix("sha256:")] = len(data)

    def learn_sizes(self, sizes: dict[str, int]) -> None:
        with self._lock:
            self.sizes.update(sizes)

    def take_stored(self, pack: str) -> str:
        """The sha256 hex of a pack the writer stored under its id (asked once, by flush)."""
        with self._lock:
            return self.stored.pop(pack)[0]

    def get_range(self, name: str, offset: int, length: int) -> bytes:
        sha = self._id(name)
        return self.backend.get_blob_range(f"sha256:{sha}", offset, length, self.sizes.get(sha, MAX_PACK_OBJECT))

    def get_object(self, name: str, limit: int) -> bytes:
        raise StoreError(f"{self.url}: no named objects in a registry ({name[:120]!r})")

    def object_exists(self, name: str) -> bool:
        raise StoreError(f"{self.url}: no named objects in a registry ({name[:120]!r})")

    def list_objects(self, sub: str) -> Iterator[tuple[str, int, float]]:
        raise StoreError(f"{self.url}: a registry cannot list blobs")

    def delete_object(self, name: str) -> None:
        raise StoreError(f"{self.url}: packs in a registry are reclaimed by its own garbage collection")


class RegistryPacks:
    """Chunk -> (pack, offset, length) for an oci:// store; writes packs, builds and reads pack indexes."""

    def __init__(self, backend: OCIBackend, target_mb: int, uploads: int) -> None:
        self.url = backend.url
        self.backend = backend
        self.blobs = RegistryBlobs(backend)
        self.writer = PackWriter(self.blobs, target_mb << 20, uploads, index=False)
        self._windows = _Windows(self.blobs)
        self._lock = threading.Lock()
        self._locs: dict[str, tuple[str, int, int]] = {}  # blake3 -> (pack sha256 hex, offset, length)
        self._packs: dict[str, list[Entry]] = {}  # pack sha256 hex -> its entries (trailer order)
        self._read_indexes: set[str] = set()  # digests of index blobs already learnt

    # ------------------------------------------------------------------ writing
    def put_chunk(self, digest: str, data: bytes) -> None:
        self.writer.add(digest, data)

    def flush(self) -> None:
        """Wait for every pack added so far; only then are its chunks known (and referenceable)."""
        for _index, pack, entries in self.writer.flush():
            self._register(self.blobs.take_stored(pack), entries)

    def close(self) -> None:
        self.writer.close()

    def _register(self, sha: str, entries: list[Entry]) -> None:
        with self._lock:
            self._packs[sha] = entries
            for d, o, n in entries:
                self._locs[d] = (sha, o, n)

    def forget(self, packs: set[str]) -> None:
        """Drop packs the registry no longer has (sha256 hex): their chunks count as not stored."""
        with self._lock:
            for sha in packs & self._packs.keys():
                for d, _o, _n in self._packs.pop(sha):
                    if self._locs.get(d, ("",))[0] == sha:
                        del self._locs[d]

    # ------------------------------------------------------------------ reading
    def has_chunk(self, digest: str) -> bool:
        with self._lock:
            return digest in self._locs

    def get_chunk(self, digest: str) -> bytes | None:
        """The chunk's stored bytes, or None if no known pack holds it."""
        with self._lock:
            loc = self._locs.get(digest)
        if loc is None:
            return None
        sha, offset, length = loc
        size = self.blobs.sizes.get(sha, 0)  # 0: unknown, read just the range
        return self._windows.read(sha, size, offset, length)

    # ------------------------------------------------------------------ manifests
    def layers(self, chunks: set[str]) -> tuple[list[dict[str, Any]], set[str]]:
        """(index layer + pack layers, chunks in no known pack) for a manifest naming chunks. The index
        blob is uploaded here, before the manifest that references it."""
        with self._lock:
            used = sorted({self._locs[d][0] for d in chunks if d in self._locs})
            rest = {d for d in chunks if d not in self._locs}
            contents = [(sha, self._packs[sha]) for sha in used]
        if not contents:
            return [], rest
        index = encode_index([(sha[:32], entries) for sha, entries in contents])
        index_sha = self.backend.retry("upload pack index", lambda: self.backend.upload_blob(index))
        out: list[dict[str, Any]] = [{"mediaType": PACK_INDEX_MT, "digest": index_sha, "size": len(index)}]
        for sha, _entries in contents:
            size = self.blobs.sizes[sha]
            out.append({"mediaType": PACK_MT, "digest": f"sha256:{sha}", "size": size})
        return out, rest

    def learn(self, layers: list[Any], what: str) -> None:
        """Learn the chunks of a manifest's packs from its index blob, or from the packs' trailers when
        the index is lost, damaged or does not match the packs (then the index blob is pushed again)."""
        index_layer = next((la for la in layers if isinstance(la, dict) and la.get("mediaType") == PACK_INDEX_MT), None)
        if index_layer is None:
            return
        packs: dict[str, int] = {}  # sha256 hex -> size, in layer order
        for la in layers:
            if not isinstance(la, dict) or la.get("mediaType") != PACK_MT:
                continue
            digest = la.get("digest")
            m = _SHA.fullmatch(digest) if isinstance(digest, str) else None
            size = la.get("size")
            if m is None or type(size) is not int or not FOOTER.size <= size <= MAX_PACK_OBJECT:
                raise Damaged(f"{what}: pack layer {str(la.get('digest'))[:80]!r} of size {size!r} refused")
            packs[m.group(1)] = size
        by_prefix = {sha[:32]: sha for sha in packs}
        if len(by_prefix) != len(packs):
            raise Damaged(f"{what}: two pack layers share a 128-bit prefix")
        index_digest = index_layer.get("digest")
        m = _SHA.fullmatch(index_digest) if isinstance(index_digest, str) else None
        if m is None:
            raise Damaged(f"{what}: pack index layer has no sha256 digest")
        index_sha = m.group(1)
        with self._lock:
            if index_sha in self._read_indexes:
                return
        self.blobs.learn_sizes(packs)
        try:
            contents = self._read_index(index_layer, index_sha, packs, by_prefix, what)
        except (Damaged, NotFound, TooLarge) as e:
            log.warning("%s: pack index unusable (%s); rebuilding it from %d pack trailer(s)", what, e, len(packs))
            contents = self._rebuild(index_sha, packs, what)
        for sha, entries in contents.items():
            self._register(sha, entries)
        with self._lock:
            self._read_indexes.add(index_sha)

    def _read_index(
        self, layer: dict[str, Any], index_sha: str, packs: dict[str, int], by_prefix: dict[str, str], what: str
    ) -> dict[str, list[Entry]]:
        size = layer.get("size")
        if type(size) is not int or not 0 <= size <= MAX_INDEX_OBJECT:
            raise Damaged(f"{what}: pack index declared as {size!r} bytes")
        raw = self.backend.retry(
            f"get pack index of {what}", lambda: self.backend.get_blob(f"sha256:{index_sha}", size, MAX_INDEX_OBJECT)
        )
        if hashlib.sha256(raw).hexdigest() != index_sha:
            raise Damaged(f"{what}: the registry's pack index blob does not match its digest")
        decoded = decode_index(raw, f"{what} pack index")
        if set(decoded) != set(by_prefix):
            raise Damaged(f"{what}: pack index names other packs than the manifest's layers")
        out: dict[str, list[Entry]] = {}
        for prefix, entries in decoded.items():
            sha = by_prefix[prefix]
            if any(o + n > packs[sha] - FOOTER.size for _d, o, n in entries):
                raise Damaged(f"{what}: pack index lists chunks outside pack {sha[:16]}")
            out[sha] = entries
        return out

    def _rebuild(self, index_sha: str, packs: dict[str, int], what: str) -> dict[str, list[Entry]]:
        out = {sha: read_trailer(self.blobs, sha, size, f"{what} pack {sha[:16]}") for sha, size in packs.items()}
        index = encode_index([(sha[:32], entries) for sha, entries in out.items()])
        if hashlib.sha256(index).hexdigest() == index_sha:
            try:  # best effort: the packs describe themselves, the next reader rebuilds again otherwise
                self.backend.retry("push rebuilt pack index", lambda: self.backend.upload_blob(index, probe=False))
                log.warning("%s: rebuilt its pack index from the pack trailers and pushed it again", what)
            except StoreError as e:
                log.warning("%s: cannot push the rebuilt pack index: %s", what, e)
        else:
            log.warning("%s: the packs' trailers do not reproduce its pack index; using the trailers", what)
        return out
