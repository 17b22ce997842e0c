"""Helpers for store tests (tests/store): building trees, comparing them, damaging stored objects."""

from __future__ import annotations

import hashlib
import json
import os
import random
import stat
import time
from pathlib import Path
from typing import Any

from shim.store import Store, open_store
from shim.store.backends.local import LocalBackend
from shim.store.backends.objects import ObjectBackend
from shim.store.backends.oci import OCIBackend
from shim.store.backends.packs import decode_trailer, encode_trailer, loose_name, pack_name
from shim.store.errors import LockLost
from shim.store.keys import encode_key, tag_prefix
from shim.store.limits import MAX_MANIFEST_OBJECT, MAX_PACK_OBJECT

MIB = 1 << 20


def wait_for_consumer(fd: int, limit: int, timeout: float = 60.0) -> bool:
    """Pace a test's producer on a streamed put: wait while more than `limit` bytes of the file it writes
    are still allocated (not yet consumed and punched out); False if the consumer freed nothing in time.

    CRIU does not wait, but a test that asserts "consumed while written" must not depend on how fast a
    loaded machine runs the consumer; with this the assertion tests punching, not speed."""
    deadline = time.monotonic() + timeout
    while os.fstat(fd).st_blocks * 512 > limit:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def make_tree(root: Path, seed: int, big_mib: int = 4) -> Path:
    """A CRIU-like directory: a page image (half random, half repetitive), small files, odd files."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    half = big_mib * MIB // 2
    pages = rng.randbytes(half) + (b"repetitive-page-%08d\n" % seed) * (half // 26) + bytes(half % 26)
    (root / "pages-1.img").write_bytes(pages)
    (root / "core-1.img").write_bytes(rng.randbytes(1900))
    (root / "empty.img").write_bytes(b"")
    (root / "one-byte").write_bytes(b"x")
    sub = root / "rootfs-diff" / "etc"
    sub.mkdir(parents=True)
    (sub / "config").write_text(f"seed={seed}\n")
    os.chmod(sub / "config", 0o640)
    (root / "run.sh").write_text("#!/bin/sh\necho hi\n")
    os.chmod(root / "run.sh", 0o751)
    (root / "emptydir").mkdir()
    os.symlink("rootfs-diff/etc/config", root / "link")
    with open(root / "sparse.img", "wb") as f:  # 64 MiB apparent, 2 small data islands
        f.truncate(64 * MIB)
        f.seek(10 * MIB + 123)
        f.write(rng.randbytes(5000))
        f.seek(64 * MIB - 3)
        f.write(b"end")
    return root


def mutate(path: Path, fraction: float, seed: int, run_pages: int = 16) -> None:
    """Overwrite `fraction` of the 4 KiB pages of a file in place, in runs of run_pages pages."""
    rng = random.Random(seed)
    size = path.stat().st_size
    npages = size // 4096
    runs = max(1, int(npages * fraction) // run_pages)
    with open(path, "r+b") as f:
        for start in rng.sample(range(npages // run_pages), runs):
            f.seek(start * run_pages * 4096)
            f.write(rng.randbytes(run_pages * 4096))


def tree_digest(root: Path) -> dict[str, tuple]:
    """path -> (type, mode, content hash or link target), for comparing restored trees."""
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", stat.S_IMODE(st.st_mode))
            else:
                h = hashlib.sha256()
                with open(p, "rb") as f:
                    while b := f.read(MIB):
                        h.update(b)
                out[rel] = ("file", stat.S_IMODE(st.st_mode), st.st_size, h.hexdigest())
    return out


def short_stale(url: str) -> float:
    """A short lock stale time for tests that wait for a dead writer's lock to lapse: 1 s, or 2 s on Azurite,
    whose lock writes take up to ~0.4 s on a loaded machine (a holder's heartbeat must land every quarter of it,
    or its own operation stops with LockLost)."""
    return 2.0 if url.startswith("az://") else 1.0


def gc_when_locks_stale(url: str) -> dict:
    """gc once a killed writer's lock is stale (short_stale on the backend's clock). The gc's own lock has that
    short stale time too, so on a loaded machine its heartbeat can miss a beat and the gc stops with LockLost
    before it deletes anything: that run is retried like a skipped one."""
    store = open_store(url, lock_stale=short_stale(url))
    deadline = time.monotonic() + 60
    while True:
        try:
            stats = store.gc(grace_seconds=0)
        except LockLost as e:
            stats = {"skipped": str(e)}
        if "skipped" not in stats:
            return stats
        assert time.monotonic() < deadline, stats
        time.sleep(0.3)


def newest_name(store: Store, key: str) -> str:
    committed = store._committed(key)
    return committed[max(committed)]


def chunks_only_in(store: Store, key: str, name: str, other: str) -> list[str]:
    return sorted(store._load(key, name).chunk_digests() - store._load(key, other).chunk_digests())


def newest_and_older_chunks(store: Store, key: str) -> tuple[int, Any, set[str]]:
    """The key's newest checkpoint (seq, manifest) and the chunk digests its older checkpoints reference."""
    committed = store._committed(key)
    newest = max(committed)
    older: set[str] = set()
    for seq, name in committed.items():
        if seq != newest:
            older |= store._load(key, name).chunk_digests()
    return newest, store._load(key, committed[newest]), older


def corrupt_chunk(store: Store, server, digest: str) -> None:
    """Flip one byte in the middle of a stored chunk, behind the store's back."""
    b = store.backend
    if isinstance(b, LocalBackend):
        b._reload()
        if digest in b._index:  # packed: flip a byte inside its slice of the pack file
            pack, off, n = b._index[digest]
            with open(b._pack_path(pack, "pack"), "r+b") as f:
                f.seek(off + n // 2)
                byte = f.read(1)[0]
                f.seek(off + n // 2)
                f.write(bytes([byte ^ 0xFF]))
            return
        p = b._chunk_path(digest)
        data = bytearray(p.read_bytes())
        data[len(data) // 2] ^= 0xFF
        p.write_bytes(bytes(data))
    elif isinstance(b, ObjectBackend):  # s3://, az://
        name, pos = loose_name(digest), None
        if b.packs is not None:
            b.packs.reload()
            loc = b.packs._index.get(digest)
            if loc is not None:  # packed: flip a byte inside its slice of the pack object
                name, pos = pack_name(loc.pack), loc.offset + loc.length // 2
        data = bytearray(b.get_object(name, MAX_PACK_OBJECT))
        data[len(data) // 2 if pos is None else pos] ^= 0xFF
        b.put_object(name, bytes(data))
    elif isinstance(b, OCIBackend):
        b._reindex()
        packed = b.packs._locs.get(digest)
        if packed is not None:  # flip a byte inside its slice of the pack blob
            sha, pos = packed[0], packed[1] + packed[2] // 2
        else:
            sha = b._locate(digest)[0].split(":", 1)[1]
        p = server.server.root / "data" / "docker/registry/v2/blobs/sha256" / sha[:2] / sha / "data"
        data = bytearray(p.read_bytes())
        data[len(data) // 2 if packed is None else pos] ^= 0xFF
        p.write_bytes(bytes(data))
    else:
        raise AssertionError(b)


def truncate_manifest(store: Store, key: str, name: str) -> None:
    b = store.backend
    if isinstance(b, LocalBackend):
        p = b.root / "manifests" / encode_key(key) / name
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    elif isinstance(b, ObjectBackend):  # s3://, az://
        k = f"manifests/{encode_key(key)}/{name}"
        data = b.get_object(k, MAX_MANIFEST_OBJECT)
        b.put_object(k, data[: len(data) // 2])
    elif isinstance(b, OCIBackend):
        # Registry blobs are immutable and digest-checked: re-point the tag at a truncated manifest blob.
        tag = tag_prefix(key) + name
        doc, _digest, _raw = b._get_manifest_doc(tag)
        layer = doc["layers"][0]
        blob = b.get_blob(layer["digest"], layer["size"], layer["size"])
        cut = blob[: len(blob) // 2]
        doc["layers"][0] = {**doc["layers"][0], "digest": b.upload_blob(cut), "size": len(cut)}
        b._put_manifest_doc(tag, json.dumps(doc).encode())
    else:
        raise AssertionError(b)


def frame_manifest(payload_json: bytes | None = None, payload: bytes | None = None) -> bytes:
    """Bytes in the real manifest framing (magic, BLAKE3 of the payload, zstd) around any JSON text.

    The digest is valid, so whatever the JSON says reaches the schema checks: how a hostile writer with
    access to the store would forge a checkpoint.
    """
    import blake3
    import zstandard

    from shim.store.model import _MAGIC

    if payload is None:
        assert payload_json is not None
        payload = zstandard.ZstdCompressor(level=3).compress(payload_json)
    return _MAGIC + blake3.blake3(payload).hexdigest().encode() + b"\n" + payload


def write_manifest(store: Store, key: str, seq: int, blob: bytes) -> str:
    """Commit raw manifest bytes as checkpoint `seq` of key, through the backend; returns its name."""
    from shim.store.model import manifest_name

    name = manifest_name(seq, "f0f0f0f0f0f0")
    store.backend.put_manifest(key, name, blob, set())
    store.backend.manifests_changed(key)
    return name


def manifest_doc(store: Store, key: str, name: str) -> dict:
    """The decoded JSON document of a stored manifest (to derive forged ones from a real one)."""
    import zstandard

    blob = store.backend.get_manifest(key, name)
    return json.loads(zstandard.ZstdDecompressor().decompress(blob[blob.index(b"\n") + 1 :]))


def host_digest(root: Path) -> dict[str, tuple]:
    """tree_digest plus owners, and the root's own mode: what a hostile restore must not touch."""
    out: dict[str, tuple] = {".": (stat.S_IMODE(os.lstat(root).st_mode), os.lstat(root).st_uid)}
    for rel, val in tree_digest(root).items():
        st = os.lstat(root / rel)
        out[rel] = (*val, st.st_uid, st.st_gid)
    return out


def replace_chunk(store: Store, server, digest: str, data: bytes) -> None:
    """Overwrite a stored chunk object with arbitrary bytes, behind the store's back (file, loose, S3 or Azure)."""
    b = store.backend
    if isinstance(b, LocalBackend):
        b._reload()
        b._index.pop(digest, None)  # the packed copy is no longer the one read
        for idx in (b.root / "packs").glob("*.idx"):
            idx.unlink()
        p = b._chunk_path(digest)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    elif isinstance(b, ObjectBackend) and b.packs is not None:
        # Packed: rewrite its pack with these bytes in the chunk's place and a trailer that says so, and
        # drop the indexes, so readers take the pack's (forged) trailer as the truth.
        b.packs.reload()
        loc = b.packs._index[digest]
        key = pack_name(loc.pack)
        raw = b.get_object(key, MAX_PACK_OBJECT)
        body, entries = bytearray(), []
        for d, o, n in decode_trailer(raw, len(raw), key):
            blob = data if d == digest else raw[o : o + n]
            entries.append((d, len(body), len(blob)))
            body += blob
        b.put_object(key, bytes(body + encode_trailer(entries)))
        for name, _size, _mtime in list(b.list_objects("index/")):
            b.delete_object(name)
        b.packs.reload()  # this store's reader too (a real pack is never rewritten under its name)
    elif isinstance(b, ObjectBackend):
        b.put_object(loose_name(digest), data)
    else:
        raise AssertionError(b)


def rss_peak_reset() -> int:
    """Reset this process's peak RSS (VmHWM) to its current RSS and return that, in bytes.

    ru_maxrss is inherited across fork and exec: a child of a big test process would start with the
    parent's peak and hide its own growth.
    """
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_bytes("VmRSS")


def rss_peak() -> int:
    return _status_bytes("VmHWM")


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise AssertionError(field)
