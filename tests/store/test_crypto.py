"""Encryption at rest on real file and S3 (SeaweedFS) stores: keyed ids, sealed chunks and manifests,
key files, wrong keys, rotation, dedup, the CLI."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import blake3
import pytest

from harness.store_util import corrupt_chunk, make_tree, newest_name, tree_digest
from shim.store import ChunkCorrupt, KeyMismatch, ManifestCorrupt, StoreError, load_key_file, open_store
from shim.store.backends.local import LocalBackend
from shim.store.limits import MAX_PACK_OBJECT

KEY = "default/mypod/main"


class Target:
    def __init__(self, url: str, server=None) -> None:
        self.url, self.server = url, server


@pytest.fixture(params=["file", "s3", "az"])
def target(request: pytest.FixtureRequest, tmp_path: Path) -> Target:
    if request.param == "file":
        return Target(f"file://{tmp_path}/store")
    srv = request.getfixturevalue("azure_server" if request.param == "az" else "s3_server")
    return Target(srv.url, srv)


def key_file(path: Path, form: str = "raw", secret: bytes | None = None) -> Path:
    secret = secret or os.urandom(32)
    data = {"raw": secret, "hex": secret.hex().encode() + b"\n", "b64": base64.b64encode(secret) + b"\n"}[form]
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, data)
    os.close(fd)
    return path


def stored_objects(store) -> list[bytes]:
    b = store.backend
    if isinstance(b, LocalBackend):
        return [p.read_bytes() for p in b.root.rglob("*") if p.is_file()]
    return [b.get_object(name, MAX_PACK_OBJECT) for name, _size, _mtime in b.list_objects("")]


def test_round_trip_ids_keyed_nothing_plain_stored(target: Target, tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src", seed=1)
    k1, k2 = key_file(tmp_path / "k1"), key_file(tmp_path / "k2")
    enc = open_store(target.url, key_files=[k1])
    info = enc.put(KEY, src, metadata={"secret-note": "hunter2"})
    _, dest = info, tmp_path / "dest"
    got = enc.get(KEY, dest)
    assert got.seq == 1 and got.metadata == {"secret-note": "hunter2"}
    assert tree_digest(dest) == tree_digest(src)
    assert enc.verify() == [] and enc.latest(KEY, verify=True).seq == 1
    # Nothing of the tree, its paths or its metadata is readable in the store.
    for blob in stored_objects(enc):
        for plain in (b"repetitive-page", b"seed=1", b"rootfs-diff", b"hunter2", b"pages-1.img"):
            assert plain not in blob
    ids1 = enc._load(KEY, newest_name(enc, KEY)).chunk_digests()
    # Ids differ from plain BLAKE3 of the same data, and between keys.
    plain = open_store(f"file://{tmp_path}/plain")
    plain.put(KEY, src)
    plain_ids = plain._load(KEY, newest_name(plain, KEY)).chunk_digests()
    other = open_store(f"file://{tmp_path}/other", key_files=[k2])
    other.put(KEY, src)
    ids2 = other._load(KEY, newest_name(other, KEY)).chunk_digests()
    assert len(ids1) == len(plain_ids) == len(ids2) > 10
    assert not ids1 & plain_ids and not ids2 & plain_ids and not ids1 & ids2
    data = (src / "core-1.img").read_bytes()  # one small file, one chunk
    assert blake3.blake3(data).hexdigest() in plain_ids and blake3.blake3(data).hexdigest() not in ids1


def test_dedup_across_encrypted_puts(target: Target, tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src", seed=2, big_mib=8)
    k1 = key_file(tmp_path / "k1", "hex")
    first = open_store(target.url, key_files=[k1]).put(KEY, src)
    second = open_store(target.url, key_files=[k1]).put(KEY, src)
    assert first.chunks_new > 10 and second.chunks_new == 0 and second.bytes_uploaded == 0


def test_flipped_byte_in_sealed_chunk_or_manifest(target: Target, tmp_path: Path) -> None:
    k1 = key_file(tmp_path / "k1")
    store = open_store(target.url, key_files=[k1])
    store.put(KEY, make_tree(tmp_path / "v1", seed=3))
    store.put(KEY, make_tree(tmp_path / "v2", seed=4))
    name2 = newest_name(store, KEY)
    bad = sorted(store._load(KEY, name2).chunk_digests() - store._load(KEY, store._committed(KEY)[1]).chunk_digests())
    corrupt_chunk(store, target.server, bad[0])
    fresh = open_store(target.url, key_files=[k1])
    problems = fresh.verify()
    assert problems and all(bad[0] in p and "seq 2" in p and "authentication" in p for p in problems), problems
    with pytest.raises(ChunkCorrupt, match="authentication"):
        fresh.get(KEY, tmp_path / "strict", fallback=False)
    # A flipped byte in the sealed manifest's ciphertext, then in its readable header.
    blob = bytearray(fresh.backend.get_manifest(KEY, name2))
    for pos in (len(blob) - 5, 3):
        damaged = bytearray(blob)
        damaged[pos] ^= 0x01
        fresh.backend.put_manifest(KEY, name2, bytes(damaged), set())
        with pytest.raises(ManifestCorrupt):
            open_store(target.url, key_files=[k1]).get(KEY, tmp_path / f"m{pos}", fallback=False)
    info = open_store(target.url, key_files=[k1]).get(KEY, tmp_path / "fallback")
    assert info.seq == 1 and tree_digest(tmp_path / "fallback") == tree_digest(tmp_path / "v1")


def test_wrong_or_missing_key_fails_clearly(target: Target, tmp_path: Path) -> None:
    k1, k2 = key_file(tmp_path / "k1"), key_file(tmp_path / "k2")
    open_store(target.url, key_files=[k1]).put(KEY, make_tree(tmp_path / "v1", seed=5, big_mib=1))
    wrong = open_store(target.url, key_files=[k2])
    with pytest.raises(KeyMismatch, match="not configured"):
        wrong.get(KEY, tmp_path / "w")
    with pytest.raises(KeyMismatch):
        wrong.latest(KEY)  # never "no checkpoint": a restorer must not start fresh
    with pytest.raises(KeyMismatch, match="no key"):
        open_store(target.url).get(KEY, tmp_path / "none")
    assert not (tmp_path / "w").exists() and not (tmp_path / "none").exists()
    # Without every key, gc cannot know which chunks are live: it sweeps nothing.
    stats = open_store(target.url).gc(grace_seconds=0)
    assert "skipped" in stats and stats["chunks_deleted"] == 0
    assert open_store(target.url, key_files=[k1]).verify() == []
    # An encrypted store reads a plaintext checkpoint only when asked to.
    open_store(target.url).put("plain/key", tmp_path / "v1")
    with pytest.raises(KeyMismatch, match="not encrypted"):
        open_store(target.url, key_files=[k1]).get("plain/key", tmp_path / "p")
    open_store(target.url, key_files=[k1], allow_plaintext=True).get("plain/key", tmp_path / "p")
    assert tree_digest(tmp_path / "p") == tree_digest(tmp_path / "v1")


def test_rotation(target: Target, tmp_path: Path) -> None:
    k1, k2 = key_file(tmp_path / "k1", "b64"), key_file(tmp_path / "k2")
    v1, v2 = make_tree(tmp_path / "v1", seed=6, big_mib=2), make_tree(tmp_path / "v2", seed=7, big_mib=2)
    open_store(target.url, key_files=[k1]).put(KEY, v1)
    both = open_store(target.url, key_files=[k2, k1])  # k2 seals from now on, k1 still opens
    assert both.put(KEY, v2).seq == 2
    assert both.verify() == []
    for seq, tree in ((1, v1), (2, v2)):
        both.get(KEY, tmp_path / f"r{seq}", seq=seq)
        assert tree_digest(tmp_path / f"r{seq}") == tree_digest(tree)
    k2_only = open_store(target.url, key_files=[k2])
    k2_only.get(KEY, tmp_path / "new", seq=2)
    with pytest.raises(KeyMismatch, match=load_key_file(k1).key_id_hex):
        k2_only.get(KEY, tmp_path / "old", seq=1)


def test_key_files_checked(tmp_path: Path) -> None:
    secret = os.urandom(32)
    ids = {load_key_file(key_file(tmp_path / f, f, secret)).key_id_hex for f in ("raw", "hex", "b64")}
    assert len(ids) == 1
    loose = key_file(tmp_path / "loose")
    for mode in (0o640, 0o604, 0o644):
        os.chmod(loose, mode)
        with pytest.raises(StoreError, match="group or others"):
            load_key_file(loose)
    short = tmp_path / "short"
    short.write_bytes(os.urandom(16))
    os.chmod(short, 0o600)
    with pytest.raises(StoreError, match="expected 32 random bytes"):
        load_key_file(short)
    with pytest.raises(StoreError, match="No such file"):
        load_key_file(tmp_path / "absent")
    os.mkdir(tmp_path / "dir", 0o700)
    with pytest.raises(StoreError, match="not a regular file"):
        load_key_file(tmp_path / "dir")
    with pytest.raises(StoreError, match="group or others"):  # the URL form goes through the same checks
        open_store(f"file://{tmp_path}/s?key_file={loose}")


def test_cli_key_file(target: Target, tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src", seed=8, big_mib=1)
    k1 = key_file(tmp_path / "k1")
    exe = str(Path(sys.executable).parent / "revenant")

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([exe, "store", *args], capture_output=True, text=True, timeout=120)

    put = cli("put", "--store", target.url, "--key", KEY, "--key-file", str(k1), "--json", str(src))
    assert put.returncode == 0, put.stderr
    assert json.loads(put.stdout)["seq"] == 1
    got = cli("get", "--store", target.url, "--key", KEY, "--key-file", str(k1), str(tmp_path / "d"))
    assert got.returncode == 0 and tree_digest(tmp_path / "d") == tree_digest(src)
    ok = cli("verify", "--store", target.url, "--key-file", str(k1), "--json")
    assert ok.returncode == 0 and json.loads(ok.stdout)["ok"]
    nokey = cli("get", "--store", target.url, "--key", KEY, str(tmp_path / "x"))
    assert nokey.returncode == 1 and "encrypted" in nokey.stderr and "key file" in nokey.stderr
    bad = cli("verify", "--store", target.url)
    assert bad.returncode == 1 and "encrypted" in bad.stdout
