"""oci:// backend: the OCI distribution API over plain HTTP(S) (urllib3).

oci://host:port/repo[?insecure=1][&mount_from=repoA,repoB][&chunked_mb=N][&auth_file=PATH]
                    [&pack_mb=N][&pack_uploads=N][&packs=0]

- Authentication (Basic, the Docker token flow) and redirects are registry_auth's: credentials from the
  node's auth_file (the node config puts it in the URL) or the Docker config file, never the URL itself.

- Chunks go into pack blobs of pack_mb MiB (default 16), pack_uploads (default 4) uploaded at once, read
  with ranged GETs (shim.store.backends.ocipacks: format, index, durability). `packs=0` stores one blob
  per chunk (named by sha256 of the stored bytes, as the registry requires; the BLAKE3 name of each chunk
  in its layer's annotations), the layout of stores written before packs, which stay readable.
- Uploads of small blobs HEAD first and skip blobs the registry has, try a cross-repository mount from
  `mount_from`; blobs go up monolithically (small) or in PATCH pieces of chunked_mb (default 8 MiB).
- Each checkpoint is an OCI image manifest with artifactType application/vnd.revenant.checkpoint.v1:
  first layer = the revenant manifest, then its pack index and one layer per pack it uses, then one
  layer per chunk stored as its own blob (so registry GC keeps them all). Tags are
  `<key slug>.<key hash>.<seq>-<nonce>` plus `<key slug>.<key hash>.latest`; `tags/list` lists them.
- Locks are tiny artifacts tagged `revenant-lock.<name>`. Blobs cannot be listed through the API, so
  `gc` here only drops manifests; the registry's own garbage-collect reclaims unreferenced blobs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import threading
import time
from typing import Any
from urllib.parse import urljoin, urlsplit

import urllib3

from ..errors import BackendUnavailable, StoreError
from ..keys import tag_prefix
from ..limits import MAX_CHUNK_OBJECT, MAX_MANIFEST_OBJECT
from .base import Backend, Damaged, NotFound, TooLarge, TransientError
from .ocipacks import PACK_INDEX_MT, RegistryPacks
from .packs import pack_mb, packs_enabled
from .registry_auth import RegistryAuth

log = logging.getLogger(__name__)

ARTIFACT_TYPE = "application/vnd.revenant.checkpoint.v1"
LOCK_ARTIFACT_TYPE = "application/vnd.revenant.lock.v1"
MANIFEST_MT = "application/vnd.oci.image.manifest.v1+json"
EMPTY_MT = "application/vnd.oci.empty.v1+json"
EMPTY = b"{}"
EMPTY_DIGEST = "sha256:" + hashlib.sha256(EMPTY).hexdigest()
REVENANT_MANIFEST_MT = "application/vnd.revenant.checkpoint.manifest.v1"
CHUNK_MT = "application/vnd.revenant.chunk.v1"
A_BLAKE3 = "io.revenant.chunk.blake3"
A_KEY = "io.revenant.checkpoint.key"
A_NAME = "io.revenant.checkpoint.name"
A_LOCK = "io.revenant.lock"
LOCK_TAG = "revenant-lock."
# Registry answers are read only up to these sizes (a tag page, an OCI manifest); blobs up to the size
# their layer declares. A hostile or broken registry cannot make the client buffer without bound.
MAX_DOC = 64 << 20


def tag_prefix_or_none(key: str) -> str:
    try:
        return tag_prefix(key)
    except ValueError:
        return "\0"  # matches no tag


def _pack_uploads(query: dict[str, str]) -> int:
    raw = query.get("pack_uploads", "4")
    if not raw.isdigit() or not 1 <= int(raw) <= 16:
        raise StoreError(f"pack_uploads must be a whole number from 1 to 16, got {raw!r}")
    return int(raw)


def _sha(data: bytes | bytearray) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class OCIBackend(Backend):
    def __init__(self, host: str, repo: str, query: dict[str, str], url: str) -> None:
        if not host or not repo:
            raise StoreError(f"oci URL must be oci://host[:port]/repository: {url!r}")
        self.url = url
        insecure = query.get("insecure") in ("1", "true", "yes")
        self.base = f"{'http' if insecure else 'https'}://{host}/v2/{repo}"
        self.repo = repo
        self.mount_from = [r for r in query.get("mount_from", "").split(",") if r]
        self.auth = RegistryAuth(
            self.base, repo, pull_repos=self.mount_from, insecure=insecure, auth_file=query.get("auth_file")
        )
        self.chunked = int(float(query.get("chunked_mb", "8")) * (1 << 20))
        self.http = urllib3.PoolManager(maxsize=32, retries=False, timeout=urllib3.Timeout(connect=5, read=120))
        self._lock = threading.Lock()
        self._blobs: dict[str, tuple[str, int]] = {}  # blake3 -> (sha256 digest, size)
        self._indexed = False
        self._have_empty = False
        self._index_lock = threading.Lock()
        # The pack layer reads packed stores whatever the URL says; packs=0 only writes chunks as blobs.
        self.packs = RegistryPacks(self, pack_mb(query), _pack_uploads(query))
        self.write_packs = packs_enabled(query)

    # ------------------------------------------------------------------ HTTP
    def _req(
        self, method: str, url: str, what: str, ok: tuple[int, ...] = (200,), **kw: Any
    ) -> urllib3.BaseHTTPResponse:
        if not url.startswith("http"):
            url = self.base + url
        try:
            r = self.auth.request(self.http, method, url, **kw)
        except urllib3.exceptions.HTTPError as e:
            raise TransientError(f"{what}: {e}") from e
        if r.status in ok:
            return r
        if r.status == 404:
            raise NotFound(f"{what}: not found")
        if r.status >= 500 or r.status == 429:
            raise TransientError(f"{what}: HTTP {r.status}")
        raise StoreError(f"{what}: HTTP {r.status}: {r.data[:300]!r}")

    def _get_bounded(
        self, url: str, what: str, limit: int, headers: dict[str, str] | None = None
    ) -> tuple[urllib3.BaseHTTPResponse, bytes]:
        """GET whose body is read only if it fits in limit bytes: (response, body) or TooLarge."""
        r = self._req("GET", url, what, headers=headers or {}, preload_content=False)
        return r, self._read_bounded(r, what, limit)

    @staticmethod
    def _read_bounded(r: urllib3.BaseHTTPResponse, what: str, limit: int) -> bytes:
        """The response's body if it fits in limit bytes, else TooLarge; the connection is released."""
        whole = False
        try:
            declared = r.headers.get("Content-Length")
            if declared is not None and (not declared.isdigit() or int(declared) > limit):
                raise TooLarge(f"{what}: the registry sends {declared} bytes, over the {limit}-byte limit")
            try:
                body = r.read(limit + 1)
            except urllib3.exceptions.HTTPError as e:
                raise TransientError(f"{what}: {e}") from e
            if len(body) > limit:
                raise TooLarge(f"{what}: the registry sent more than {limit} bytes")
            if declared is not None and len(body) < int(declared):  # urllib3 1.26 does not check this
                raise TransientError(f"{what}: the connection ended after {len(body)} of {declared} bytes")
            whole = True
            return body
        finally:
            if not whole:  # unread bytes left on the connection: it must not go back to the pool
                r.close()
            r.release_conn()

    @staticmethod
    def _json(body: bytes, what: str) -> dict[str, Any]:
        try:
            doc = json.loads(body)
        except ValueError as e:
            raise StoreError(f"{what}: not JSON: {e}") from None
        if not isinstance(doc, dict):
            raise StoreError(f"{what}: not a JSON object")
        return doc

    def _blob_exists(self, digest: str) -> bool:
        """Whether the repository serves the blob. distribution answers HTTP 500 for a blob whose link
        file a crash left empty, until the blob is pushed again: so 500 means "push it" (if the server
        is down instead, the push fails and is retried)."""
        try:
            r = self._req("HEAD", f"/blobs/{digest}", f"HEAD blob {digest}", ok=(200, 500))
        except NotFound:
            return False
        if r.status == 500:
            log.warning("registry %s answered HTTP 500 for blob %s; pushing it again", self.base, digest)
            return False
        return True

    def upload_blob(self, data: bytes | bytearray, probe: bool = True) -> str:
        """Push a blob, returning its digest. probe=False (a fresh pack, which no registry has yet) skips
        the HEAD and the cross-repository mount."""
        digest = _sha(data)
        if probe and self._blob_exists(digest):
            return digest
        loc = None
        for source in self.mount_from if probe else ():
            r = self._req("POST", f"/blobs/uploads/?mount={digest}&from={source}", "mount blob", ok=(201, 202))
            if r.status == 201:
                return digest
            loc = r.headers["Location"]  # not mounted: the registry opened a normal upload session
            break
        if loc is None:
            loc = self._req("POST", "/blobs/uploads/", "start upload", ok=(202,)).headers["Location"]
        loc = urljoin(self.base, loc)
        body: bytes | bytearray | memoryview
        if len(data) > self.chunked:
            view = memoryview(data)
            for start in range(0, len(data), self.chunked):
                piece = view[start : start + self.chunked]
                r = self._req(
                    "PATCH",
                    loc,
                    "upload piece",
                    ok=(202,),
                    body=piece,
                    headers={
                        "Content-Type": "application/octet-stream",
                        "Content-Range": f"{start}-{start + len(piece) - 1}",
                        "Content-Length": str(len(piece)),
                    },
                )
                loc = urljoin(self.base, r.headers["Location"])
            body = b""
        else:
            body = data
        sep = "&" if "?" in loc else "?"
        self._req(
            "PUT",
            f"{loc}{sep}digest={digest}",
            "finish upload",
            ok=(201,),
            body=body,
            headers={"Content-Type": "application/octet-stream", "Content-Length": str(len(body))},
        )
        return digest

    def get_blob(self, digest: str, size: int, limit: int) -> bytes:
        """A blob of the size its descriptor declares (which must be within limit)."""
        if type(size) is not int or not 0 <= size <= limit:
            raise TooLarge(f"blob {digest} is declared as {size!r} bytes, over the {limit}-byte limit")
        _r, body = self._get_bounded(f"/blobs/{digest}", f"GET blob {digest}", size)
        if len(body) != size:
            raise Damaged(f"blob {digest}: {len(body)} bytes, expected {size}")
        return body

    def get_blob_range(self, digest: str, offset: int, length: int, blob_size: int) -> bytes:
        """length bytes at offset of a blob: a ranged GET; a registry that ignores Range sends the whole
        blob, read only up to blob_size (the size its layer declares) and cut here."""
        if offset < 0 or length <= 0 or offset + length > blob_size:
            raise Damaged(f"blob {digest}: bytes {offset}+{length} lie outside its {blob_size} bytes")
        what = f"GET blob {digest} bytes {offset}+{length}"
        end = offset + length - 1
        r = self._req(
            "GET",
            f"/blobs/{digest}",
            what,
            ok=(200, 206),
            headers={"Range": f"bytes={offset}-{end}"},
            preload_content=False,
        )
        if r.status == 206:
            got = r.headers.get("Content-Range", "")
            if not got.startswith(f"bytes {offset}-{end}/"):
                r.close()
                r.release_conn()
                raise Damaged(f"{what}: the registry sent the range {got[:80]!r}")
            body = self._read_bounded(r, what, length)
            if len(body) != length:
                raise Damaged(f"{what}: the registry sent {len(body)} bytes")
            return body
        body = self._read_bounded(r, what, blob_size)  # Range ignored: the whole blob
        if len(body) < offset + length:
            raise Damaged(f"{what}: the blob has only {len(body)} bytes")
        return body[offset : offset + length]

    def _tags(self) -> list[str]:
        tags: list[str] = []
        url = "/tags/list?n=1000"
        while url:
            try:
                r, body = self._get_bounded(url, "list tags", MAX_DOC)
            except NotFound:  # repository does not exist yet
                return []
            page = self._json(body, "list tags").get("tags") or []
            if not isinstance(page, list) or not all(isinstance(t, str) for t in page):
                raise StoreError(f"{self.url}: list tags: the registry sent a malformed tag list")
            tags += page
            link = r.headers.get("Link", "")
            url = link[link.index("<") + 1 : link.index(">")] if "<" in link and ">" in link else ""
            if url:
                url = self._same_origin(urljoin(self.base, url), "tag list Link")
        return tags

    def _same_origin(self, url: str, what: str) -> str:
        """A URL the registry handed us, accepted only on the registry's own scheme, host and port."""
        got, base = urlsplit(url), urlsplit(self.base)
        if (got.scheme, got.netloc) != (base.scheme, base.netloc) or not got.path.startswith("/v2/"):
            raise StoreError(f"{self.url}: the registry's {what} points elsewhere ({url[:200]!r}): refused")
        return url

    def _get_manifest_doc(self, ref: str) -> tuple[dict[str, Any], str, bytes]:
        what = f"GET manifest {ref}"
        r, body = self._get_bounded(f"/manifests/{ref}", what, MAX_DOC, headers={"Accept": MANIFEST_MT})
        return self._json(body, what), r.headers.get("Docker-Content-Digest", _sha(body)), body

    def _put_manifest_doc(self, ref: str, raw: bytes) -> None:
        try:
            self._req(
                "PUT",
                f"/manifests/{ref}",
                f"PUT manifest {ref}",
                ok=(201,),
                body=raw,
                headers={"Content-Type": MANIFEST_MT},
            )
        except StoreError as e:
            # Another client committing the same blob at this moment makes the registry briefly see it
            # as unknown or invalid (seen with two writers); the blob is there on the next try.
            if "DIGEST_INVALID" in str(e) or "BLOB_UNKNOWN" in str(e):
                raise TransientError(str(e)) from e
            raise

    def _delete_ref(self, ref: str) -> None:
        try:
            r = self._req("HEAD", f"/manifests/{ref}", f"HEAD manifest {ref}", headers={"Accept": MANIFEST_MT})
        except NotFound:
            return
        digest = r.headers["Docker-Content-Digest"]
        with contextlib.suppress(NotFound):
            self._req("DELETE", f"/manifests/{digest}", f"DELETE manifest {ref}", ok=(202, 200))

    def _remember(self, doc: dict[str, Any], what: str) -> None:
        layers = doc.get("layers")
        if not isinstance(layers, list):
            return
        if any(isinstance(la, dict) and la.get("mediaType") == PACK_INDEX_MT for la in layers):
            try:
                self.packs.learn(layers, f"{self.url} {what}")
            except (TransientError, BackendUnavailable):
                raise  # the registry is away: not a damaged checkpoint
            except StoreError as e:  # its chunks stay unknown: a restore of it fails on them, naming them
                log.warning("%s: cannot read the packs of %s: %s", self.url, what, e)
        with self._lock:
            for layer in layers:
                if not isinstance(layer, dict) or not isinstance(layer.get("annotations"), dict):
                    continue
                b3, digest, size = layer["annotations"].get(A_BLAKE3), layer.get("digest"), layer.get("size")
                if not (isinstance(b3, str) and isinstance(digest, str) and digest.startswith("sha256:")):
                    continue
                if isinstance(size, int) and not isinstance(size, bool) and 0 <= size <= MAX_CHUNK_OBJECT:
                    self._blobs[b3] = (digest, size)

    def _index(self) -> None:
        with self._index_lock:  # one listing, not one per upload thread
            if not self._indexed:
                self._build_index()

    def _build_index(self) -> None:
        for tag in self._tags():
            if not tag.startswith(LOCK_TAG) and not tag.endswith(".latest"):
                try:
                    self._remember(self._get_manifest_doc(tag)[0], f"manifest {tag}")
                except NotFound:
                    continue
        self._indexed = True

    # ------------------------------------------------------------------ chunks
    def has_chunk(self, digest: str) -> bool:
        self._index()
        if self.packs.has_chunk(digest):
            return True
        with self._lock:
            return digest in self._blobs

    def put_chunk(self, digest: str, data: bytes) -> None:
        if self.write_packs:
            self.packs.put_chunk(digest, data)
            return
        sha = self.upload_blob(data)
        with self._lock:
            self._blobs[digest] = (sha, len(data))

    def flush_chunks(self) -> None:
        if self.write_packs:
            self.packs.flush()

    def _locate(self, digest: str) -> tuple[str, int]:
        with self._lock:
            loc = self._blobs.get(digest)
        if loc is None:
            self._indexed = False
            self._index()
            with self._lock:
                loc = self._blobs.get(digest)
        if loc is None:
            raise NotFound(f"chunk {digest} is not referenced by any manifest in {self.repo}")
        return loc

    def get_chunk(self, digest: str) -> bytes:
        self._index()
        for attempt in range(2):
            data = self.packs.get_chunk(digest)
            if data is not None:
                return data
            with self._lock:
                loc = self._blobs.get(digest)
            if loc is not None:
                return self.get_blob(loc[0], loc[1], MAX_CHUNK_OBJECT)
            if attempt == 0:  # committed by another client since the index was built
                self._reindex()
        raise NotFound(f"chunk {digest} is not referenced by any manifest in {self.repo}")

    def _reindex(self) -> None:
        with self._index_lock:
            self._build_index()

    def delete_chunk(self, digest: str) -> None:
        """A chunk stored as its own blob is deleted; a packed one is left to the registry's GC, which
        reclaims its pack once no manifest lists it (a pack is never rewritten here)."""
        with self._lock:
            loc = self._blobs.get(digest)
        if loc is not None:
            with contextlib.suppress(NotFound):
                self._req("DELETE", f"/blobs/{loc[0]}", "DELETE blob", ok=(202, 200))

    def _unknown(self, chunks: set[str]) -> set[str]:
        with self._lock:
            return {d for d in chunks if d not in self._blobs and not self.packs.has_chunk(d)}

    def _check_durable(self, chunks: set[str]) -> None:
        """Refuse a manifest naming a chunk not known to be in a stored pack or blob: a pack whose
        background upload failed must never be referenced."""
        missing = self._unknown(chunks)
        if missing:
            self._reindex()
            missing = self._unknown(chunks)
        if missing:
            raise StoreError(
                f"{self.url}: {len(missing)} chunk(s) of this checkpoint are not stored (a pack upload failed?), "
                f"e.g. {sorted(missing)[0]}; not committed"
            )

    # ------------------------------------------------------------------ manifests
    def put_manifest(self, key: str, name: str, data: bytes, chunks: set[str]) -> None:
        self._ensure_empty()
        self._check_durable(chunks)
        mdigest = self.upload_blob(data)
        layers = [{"mediaType": REVENANT_MANIFEST_MT, "digest": mdigest, "size": len(data)}]
        pack_layers, loose = self.packs.layers(chunks)
        layers += pack_layers
        for d in sorted(loose):
            sha, size = self._locate(d)
            layers.append({"mediaType": CHUNK_MT, "digest": sha, "size": size, "annotations": {A_BLAKE3: d}})
        doc = {
            "schemaVersion": 2,
            "mediaType": MANIFEST_MT,
            "artifactType": ARTIFACT_TYPE,
            "config": {"mediaType": EMPTY_MT, "digest": EMPTY_DIGEST, "size": len(EMPTY)},
            "layers": layers,
            "annotations": {
                A_KEY: key,
                A_NAME: name,
                "org.opencontainers.image.created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            },
        }
        try:
            self._put_manifest_doc(tag_prefix(key) + name, json.dumps(doc, separators=(",", ":")).encode())
        except TransientError as e:
            if "BLOB_UNKNOWN" in str(e):
                self._check_layers(layers[1:])
            raise

    def _check_layers(self, layers: list[dict[str, Any]]) -> None:
        """After the registry called a layer unknown: a blob this client still counted on may have been
        reclaimed by the registry's garbage collection (every manifest listing it deleted). Then this
        manifest can never be written: forget the blobs (the next put uploads their chunks again) and
        say so; otherwise it was a commit racing another writer's, which a retry gets past."""
        gone = {la["digest"] for la in layers if not self._blob_exists(la["digest"])}
        if not gone:
            return
        self.packs.forget({d.removeprefix("sha256:") for d in gone})
        with self._lock:
            self._blobs = {b3: loc for b3, loc in self._blobs.items() if loc[0] not in gone}
        raise StoreError(
            f"{self.url}: {len(gone)} blob(s) this checkpoint reuses are gone from the registry (its garbage "
            f"collection?), e.g. {sorted(gone)[0]}; not committed, the next put uploads their chunks again"
        )

    def get_manifest(self, key: str, name: str) -> bytes:
        doc, _digest, _raw = self._get_manifest_doc(tag_prefix(key) + name)
        self._remember(doc, f"manifest {tag_prefix(key) + name}")
        layers = doc.get("layers") or []
        first = layers[0] if isinstance(layers, list) and layers else None
        if not isinstance(first, dict) or first.get("mediaType") != REVENANT_MANIFEST_MT:
            return b""  # decodes as a damaged manifest, named by the caller
        if not isinstance(first.get("digest"), str) or not first["digest"].startswith("sha256:"):
            return b""
        try:
            size: Any = first.get("size")  # checked by _get_blob
            return self.get_blob(first["digest"], size, MAX_MANIFEST_OBJECT)
        except NotFound:
            return b""

    def list_manifests(self, key: str | None) -> list[tuple[str, str]]:
        out = []
        if key is not None:
            prefix = tag_prefix(key)
            for tag in self._tags():
                rest = tag[len(prefix) :] if tag.startswith(prefix) else ""
                if rest and rest != "latest":
                    out.append((key, rest))
            return out
        for tag in self._tags():
            if tag.startswith(LOCK_TAG) or tag.endswith(".latest"):
                continue
            try:
                doc, _digest, _raw = self._get_manifest_doc(tag)
            except NotFound:
                continue
            ann = doc.get("annotations") or {}
            if not isinstance(ann, dict) or doc.get("artifactType") != ARTIFACT_TYPE:
                continue
            key, name = ann.get(A_KEY), ann.get(A_NAME)
            if isinstance(key, str) and isinstance(name, str) and tag == tag_prefix_or_none(key) + name:
                out.append((key, name))
            else:
                log.warning("%s: skipping tag %s: its annotations do not match its name", self.url, tag[:120])
        return out

    def delete_manifest(self, key: str, name: str) -> None:
        self._delete_ref(tag_prefix(key) + name)

    def manifests_changed(self, key: str) -> None:
        """Point `<key>.latest` at the newest checkpoint so `key:latest`-style lookups work."""
        from ..model import parse_manifest_name

        names = sorted((p, n) for _k, n in self.list_manifests(key) if (p := parse_manifest_name(n)))
        if not names:
            self._delete_ref(tag_prefix(key) + "latest")
            return
        newest_seq = names[-1][0][0]
        newest = min(n for p, n in names if p[0] == newest_seq)
        try:
            _doc, _digest, raw = self._get_manifest_doc(tag_prefix(key) + newest)
            self._put_manifest_doc(tag_prefix(key) + "latest", raw)
        except NotFound:
            pass

    # ------------------------------------------------------------------ locks
    def _ensure_empty(self) -> None:
        if not self._have_empty:
            self.upload_blob(EMPTY)
            self._have_empty = True

    def put_lock(self, name: str, data: bytes) -> None:
        self._ensure_empty()
        doc = {
            "schemaVersion": 2,
            "mediaType": MANIFEST_MT,
            "artifactType": LOCK_ARTIFACT_TYPE,
            "config": {"mediaType": EMPTY_MT, "digest": EMPTY_DIGEST, "size": len(EMPTY)},
            "layers": [{"mediaType": EMPTY_MT, "digest": EMPTY_DIGEST, "size": len(EMPTY)}],
            "annotations": {A_LOCK: data.decode()},
        }
        self._put_manifest_doc(LOCK_TAG + name, json.dumps(doc).encode())

    def list_locks(self) -> list[tuple[str, bytes]]:
        out = []
        for tag in self._tags():
            if tag.startswith(LOCK_TAG):
                try:
                    doc = self._get_manifest_doc(tag)[0]
                except NotFound:
                    continue
                ann = doc.get("annotations")
                body = ann.get(A_LOCK, "") if isinstance(ann, dict) else ""
                out.append((tag[len(LOCK_TAG) :], body.encode() if isinstance(body, str) else b""))
        return out

    def delete_lock(self, name: str) -> None:
        self._delete_ref(LOCK_TAG + name)

    def close(self) -> None:
        self.packs.close()
        self.http.clear()
