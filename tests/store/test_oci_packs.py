"""Packs on oci:// stores (the real docker-registry): manifests stay small, dedup across checkpoints, crash
mid-pack, lost and damaged pack indexes rebuilt from trailers, failing background uploads, stores written
one blob per chunk, hostile index blobs and trailers, ranged reads."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from harness.servers import Registry
from harness.store_util import MIB, make_tree, mutate, tree_digest
from shim.store import BackendUnavailable, ChunkCorrupt, Chunker, StoreError, open_store
from shim.store.backends.base import Damaged
from shim.store.backends.oci import CHUNK_MT, OCIBackend
from shim.store.backends.ocipacks import PACK_INDEX_MT, PACK_MT
from shim.store.backends.packs import ENTRY, FOOTER, decode_index, decode_trailer, encode_index
from shim.store.keys import tag_prefix

KEY = "default/mypod/main"
ROOT = Path(__file__).resolve().parents[2]

CHILD = textwrap.dedent("""
    import sys
    from pathlib import Path
    sys.path.insert(0, sys.argv[1])
    from shim.store import open_store
    open_store(sys.argv[2]).put(sys.argv[3], Path(sys.argv[4]))
""")


def backend(store) -> OCIBackend:
    assert isinstance(store.backend, OCIBackend)
    return store.backend


def manifest(store, seq: int) -> tuple[dict[str, Any], bytes]:
    name = next(i.name for i in store.list(KEY) if i.seq == seq)
    doc, _digest, raw = backend(store)._get_manifest_doc(tag_prefix(KEY) + name)
    return doc, raw


def layers(doc: dict[str, Any], media_type: str) -> list[dict[str, Any]]:
    return [la for la in doc["layers"] if la["mediaType"] == media_type]


def repo_dir(registry) -> Path:
    repo = registry.url.split("?")[0].rsplit("/", 1)[1]
    return registry.server.root / "data" / "docker/registry/v2/repositories" / repo


def repo_blobs(registry) -> set[str]:
    """sha256 hex of every blob linked into the test's repository (what the registry serves it)."""
    return {p.parent.name for p in (repo_dir(registry) / "_layers/sha256").glob("*/link")}


def blob_file(registry, sha: str) -> Path:
    return registry.server.root / "data/docker/registry/v2/blobs/sha256" / sha[:2] / sha / "data"


def restores(store, tmp_path: Path, seq: int, tree: Path) -> None:
    dest = tmp_path / f"r{seq}-{time.monotonic_ns()}"
    store.get(KEY, dest, seq=seq, fallback=False)
    assert tree_digest(dest) == tree_digest(tree)


def replace_manifest(store, seq: int, doc: dict[str, Any]) -> None:
    name = next(i.name for i in store.list(KEY) if i.seq == seq)
    backend(store)._put_manifest_doc(tag_prefix(KEY) + name, json.dumps(doc).encode())


def test_round_trip_in_packs_with_ranged_reads(oci_registry, tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src", seed=1, big_mib=8)
    store = open_store(oci_registry.url + "&pack_mb=1")
    info = store.put(KEY, src)
    doc, _raw = manifest(store, 1)
    packs, (index,) = layers(doc, PACK_MT), layers(doc, PACK_INDEX_MT)
    assert layers(doc, CHUNK_MT) == [], "a packed store writes no per-chunk layer"
    assert 2 <= len(packs) < info.chunks_new / 4, (len(packs), info.chunks_new)
    assert max(p["size"] for p in packs) < 2 * MIB  # sealed once past 1 MiB: one chunk over at most
    # The index blob names exactly the manifest's packs, with the entries of their trailers.
    b = backend(store)
    content = decode_index(b.get_blob(index["digest"], index["size"], 1 << 30), "index")
    assert set(content) == {p["digest"][7:39] for p in packs}
    first = packs[0]
    raw = b.get_blob(first["digest"], first["size"], 1 << 30)
    assert content[first["digest"][7:39]] == decode_trailer(raw, len(raw), "pack")
    # distribution serves Range on blob GETs: the reader gets 206 and just the bytes asked for.
    base = oci_registry.url.split("?")[0].replace("oci://", "http://", 1).replace("/revenant", "/v2/revenant", 1)
    req = urllib.request.Request(f"{base}/blobs/{first['digest']}", headers={"Range": "bytes=10-19"})
    with urllib.request.urlopen(req) as r:
        assert r.status == 206 and r.read() == raw[10:20]
    assert b.get_blob_range(first["digest"], 5, 100, first["size"]) == raw[5:105]
    with pytest.raises(Damaged, match="outside"):
        b.get_blob_range(first["digest"], first["size"] - 5, 10, first["size"])
    restores(open_store(oci_registry.url), tmp_path, 1, src)
    assert open_store(oci_registry.url).verify() == []


def test_dedup_across_checkpoints_lists_earlier_packs_again(oci_registry, tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src", seed=2, big_mib=16)
    url = oci_registry.url + "&pack_mb=1"
    first = open_store(url).put(KEY, src)
    mutate(src / "pages-1.img", 0.05, seed=3)
    store = open_store(url)  # a new client learns the chunks from the manifests' pack indexes
    second = store.put(KEY, src)
    assert second.seq == 2 and second.bytes_uploaded < 0.25 * first.bytes_uploaded, (first, second)
    one, _ = manifest(store, 1)
    two, _ = manifest(store, 2)
    old = {p["digest"] for p in layers(one, PACK_MT)}
    new = {p["digest"] for p in layers(two, PACK_MT)}
    assert old & new, "the second checkpoint lists the packs of the first it still uses"
    assert new - old, "and the packs of its own new chunks"
    # Every chunk of checkpoint 2 is in a pack its own manifest lists (registry GC keeps them alive).
    b = open_store(url).backend
    b._index()
    listed = {d[7:] for d in new}
    for digest in store._load(KEY, store.list(KEY)[-1].name).chunk_digests():
        assert b.packs._locs[digest][0] in listed
    store.delete(KEY, 1)
    restores(open_store(url), tmp_path, 2, src)


def test_manifest_stays_small_for_many_chunks(oci_registry, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "pages-1.img").write_bytes(os.urandom(48 * MIB))
    store = open_store(oci_registry.url + "&pack_mb=1", chunker=Chunker.parse("fixed:4096"))
    info = store.put(KEY, src)
    assert info.chunks_total >= 12_000
    doc, raw = manifest(store, 1)
    packs = layers(doc, PACK_MT)
    # One blob per chunk took ~255 bytes a chunk (3 MB here); packs take ~130 bytes per MiB of chunks.
    assert len(packs) <= 50 and len(raw) < 16 << 10, (len(packs), len(raw))
    restores(open_store(oci_registry.url), tmp_path, 1, src)


def test_crash_mid_pack_leaves_nothing_referenced(oci_registry, tmp_path: Path) -> None:
    url = oci_registry.url + "&pack_mb=1"
    v1 = make_tree(tmp_path / "v1", seed=4, big_mib=4)
    open_store(url).put(KEY, v1)
    before = repo_blobs(oci_registry)
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "pages-1.img").write_bytes(os.urandom(6 * MIB))
    env = dict(os.environ, REVENANT_SNAPSHOTTER_CRASH_AT="store.pack.after-upload")
    child = subprocess.run([sys.executable, "-c", CHILD, str(ROOT), url, KEY, str(v2)], env=env, timeout=300)
    assert child.returncode == -9
    orphans = repo_blobs(oci_registry) - before
    assert orphans, "the killed put stored a pack"
    fresh = open_store(url, lock_stale=1)
    assert [i.seq for i in fresh.list(KEY)] == [1]
    referenced = {la["digest"][7:] for la in manifest(fresh, 1)[0]["layers"]}
    assert not orphans & referenced, "a pack of the killed put is referenced"
    restores(fresh, tmp_path, 1, v1)
    deadline = time.monotonic() + 30
    while True:  # the dead writer's lock goes stale
        try:
            assert fresh.put(KEY, v2).seq == 2
            break
        except StoreError:
            assert time.monotonic() < deadline
            time.sleep(0.5)
    restores(open_store(url), tmp_path, 2, v2)


def test_lost_or_damaged_index_rebuilt_from_trailers(
    oci_registry, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    url = oci_registry.url + "&pack_mb=1"
    src = make_tree(tmp_path / "src", seed=5, big_mib=6)
    store = open_store(url)
    store.put(KEY, src)
    (index,) = layers(manifest(store, 1)[0], PACK_INDEX_MT)
    sha = index["digest"][7:]
    original = blob_file(oci_registry, sha).read_bytes()
    # Lost: the registry no longer serves the index blob.
    backend(store)._req("DELETE", f"/blobs/{index['digest']}", "delete index", ok=(202,))
    with caplog.at_level(logging.WARNING):
        restores(open_store(url), tmp_path, 1, src)
    assert "rebuilding it from" in caplog.text and "pushed it again" in caplog.text
    assert sha in repo_blobs(oci_registry), "the rebuilt index (same bytes, same digest) is served again"
    assert blob_file(oci_registry, sha).read_bytes() == original
    # Damaged: the registry serves other bytes under the index's digest.
    blob_file(oci_registry, sha).write_bytes(b"RVNTIDX1" + b"\xff" * (len(original) - 8))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        restores(open_store(url), tmp_path, 1, src)
    assert "does not match its digest" in caplog.text
    assert open_store(url).verify() == []


def test_failing_background_upload_commits_nothing_and_retry_succeeds(oci_registry, tmp_path: Path) -> None:
    url = oci_registry.url + "&pack_mb=1"
    v1 = make_tree(tmp_path / "v1", seed=6)
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "pages-1.img").write_bytes(os.urandom(24 * MIB))
    store = open_store(url)
    store.put(KEY, v1)
    store.backend.retries, store.backend.backoff = 3, 0.1
    stopped = threading.Event()

    def stop_midway(done: int, total: int) -> None:
        if done > total // 3 and not stopped.is_set():
            stopped.set()
            oci_registry.stop()

    with pytest.raises(BackendUnavailable, match=r"upload pack \w+ failed after 3 attempts"):
        store.put(KEY, v2, progress=stop_midway)
    oci_registry.start()
    fresh = open_store(url)
    assert [i.seq for i in fresh.list(KEY)] == [1], "a failed put must commit nothing"
    restores(fresh, tmp_path, 1, v1)
    assert store.put(KEY, v2).seq == 2  # the same store object: the failure is not sticky
    restores(open_store(url), tmp_path, 2, v2)
    assert open_store(url).verify() == []


def test_manifest_never_names_a_chunk_not_stored(oci_registry, tmp_path: Path) -> None:
    store = open_store(oci_registry.url + "&pack_mb=1")
    b = backend(store)
    b.put_chunk("ab" * 32, b"\x00" + os.urandom(1000))  # added to a pack, never flushed
    with pytest.raises(StoreError, match="not stored"):
        b.put_manifest(KEY, "0000000001-x", b"{}", {"ab" * 32})
    assert store.list(KEY) == []
    assert store.put(KEY, make_tree(tmp_path / "src", seed=7)).seq == 1


def test_store_written_one_blob_per_chunk_stays_readable(oci_registry, tmp_path: Path) -> None:
    v1 = make_tree(tmp_path / "v1", seed=8, big_mib=4)
    open_store(oci_registry.url + "&packs=0").put(KEY, v1)
    store = open_store(oci_registry.url + "&pack_mb=1")
    assert layers(manifest(store, 1)[0], CHUNK_MT), "packs=0 writes the layout of stores before packs"
    restores(store, tmp_path, 1, v1)
    v2 = tmp_path / "v2"
    shutil.copytree(v1, v2, symlinks=True)
    mutate(v2 / "pages-1.img", 0.2, seed=9)
    info = store.put(KEY, v2)
    assert info.chunks_new < info.chunks_total / 2, "dedup against the per-chunk blobs"
    two = manifest(store, 2)[0]
    assert layers(two, PACK_MT) and layers(two, CHUNK_MT), "new chunks packed, old ones listed as blobs"
    restores(open_store(oci_registry.url), tmp_path, 2, v2)
    restores(open_store(oci_registry.url + "&packs=0"), tmp_path, 2, v2)  # an old-layout writer reads packs


def test_hostile_index_blobs_and_trailers(oci_registry, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    url = oci_registry.url + "&pack_mb=1"
    src = make_tree(tmp_path / "src", seed=10, big_mib=2)
    store = open_store(url)
    store.put(KEY, src)
    b = backend(store)
    doc, _raw = manifest(store, 1)
    (index,) = layers(doc, PACK_INDEX_MT)
    content = decode_index(b.get_blob(index["digest"], index["size"], 1 << 30), "index")
    pack, entries = next(iter(content.items()))
    d, _o, n = entries[0]

    def with_index(forged: bytes) -> dict[str, Any]:
        new = {"mediaType": PACK_INDEX_MT, "digest": b.upload_blob(forged), "size": len(forged)}
        return {**doc, "layers": [new if la == index else la for la in doc["layers"]]}

    # An index pointing past its pack's end, naming other packs, or not an index at all: the trailers are used.
    other = dict(content)
    other["ee" * 16] = entries
    for forged, complaint in [
        (encode_index([(p, [(d, 100 << 20, n), *e[1:]] if p == pack else e) for p, e in content.items()]), "outside"),
        (encode_index(sorted(other.items())), "other packs"),
        (b"NOTINDEX" + bytes(8), "bad magic"),
    ]:
        replace_manifest(store, 1, with_index(forged))
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            restores(open_store(url), tmp_path, 1, src)
        assert complaint in caplog.text and "rebuilding it from" in caplog.text
    # A pack layer declaring an absurd size is refused before anything is read.
    huge = [{**la, "size": 1 << 40} if la["mediaType"] == PACK_MT else la for la in doc["layers"]]
    replace_manifest(store, 1, {**doc, "layers": huge})
    caplog.clear()
    with caplog.at_level(logging.WARNING), pytest.raises(ChunkCorrupt, match="is missing"):
        open_store(url).get(KEY, tmp_path / "d1", fallback=False)
    assert "refused" in caplog.text
    # A pack whose trailer lies (an offset past its data) and no usable index: refused, named in the log,
    # and the restore fails on the chunk it cannot find.
    replace_manifest(store, 1, with_index(b"NOTINDEX" + bytes(8)))
    full = next(la for la in doc["layers"] if la["mediaType"] == PACK_MT and la["digest"][7:39] == pack)
    path = blob_file(oci_registry, full["digest"][7:])
    raw = path.read_bytes()
    last = decode_trailer(raw, len(raw), pack)[-1][0]
    forged = raw[: -FOOTER.size - ENTRY.size] + ENTRY.pack(bytes.fromhex(last), len(raw), n) + raw[-FOOTER.size :]
    path.write_bytes(forged)
    caplog.clear()
    with caplog.at_level(logging.WARNING), pytest.raises(ChunkCorrupt, match="is missing"):
        open_store(url).get(KEY, tmp_path / "d2", fallback=False)
    assert "lies outside" in caplog.text


class _NoRange(BaseHTTPRequestHandler):
    """A read-only front to the real registry that drops Range headers (as some registries and proxies do)
    and counts how many it dropped."""

    upstream = ""
    dropped = 0

    def log_message(self, *args: object) -> None:
        pass

    def _forward(self, method: str) -> None:
        if self.headers.get("Range"):
            type(self).dropped += 1
        headers = {k: v for k, v in self.headers.items() if k.lower() in ("accept", "authorization")}
        req = urllib.request.Request(self.upstream + self.path, method=method, headers=headers)
        try:
            r = urllib.request.urlopen(req)
        except urllib.error.HTTPError as e:
            r = e
        body = r.read()
        self.send_response(r.status)
        for name in ("Content-Type", "Docker-Content-Digest", "Link"):
            if r.headers.get(name):
                self.send_header(name, r.headers[name])
        self.send_header("Content-Length", str(len(body) if method == "GET" else r.headers.get("Content-Length", 0)))
        self.end_headers()
        if method == "GET":
            self.wfile.write(body)

    def do_GET(self) -> None:
        self._forward("GET")

    def do_HEAD(self) -> None:
        self._forward("HEAD")


def test_registry_ignoring_range_is_read_whole_blobs(oci_registry, tmp_path: Path) -> None:
    url = oci_registry.url + "&pack_mb=8"  # packs over the reader's 4 MiB window: reads at offsets > 0
    src = make_tree(tmp_path / "src", seed=11, big_mib=12)
    open_store(url).put(KEY, src)
    port = oci_registry.url.split("?")[0].split("/")[2].split(":")[1]
    _NoRange.upstream, _NoRange.dropped = f"http://127.0.0.1:{port}", 0
    front = ThreadingHTTPServer(("127.0.0.1", 0), _NoRange)
    threading.Thread(target=front.serve_forever, daemon=True).start()
    try:
        repo = oci_registry.url.split("?")[0].rsplit("/", 1)[1]
        via = f"oci://127.0.0.1:{front.server_address[1]}/{repo}?insecure=1"
        restores(open_store(via), tmp_path, 1, src)
        assert _NoRange.dropped > 0, "the reader sent no ranged GET"
        assert open_store(via).verify() == []
    finally:
        front.shutdown()


def test_registry_gc_reclaims_only_packs_no_manifest_lists(tmp_path: Path) -> None:
    """The registry's own garbage collection is what reclaims packs: it keeps every pack a remaining
    checkpoint lists (earlier packs are listed again) and removes the others; a long-lived client that
    still counted on a removed pack fails its next commit clearly and recovers on the put after."""
    (tmp_path / "reg").mkdir()
    srv = Registry(tmp_path / "reg")
    srv.start()
    try:
        url = f"oci://127.0.0.1:{srv.port}/gc-test?insecure=1&pack_mb=1"
        v1, v2 = tmp_path / "v1", tmp_path / "v2"
        v1.mkdir()
        v2.mkdir()
        kept = os.urandom(3 * MIB)
        (v1 / "kept.img").write_bytes(kept)
        (v1 / "dropped.img").write_bytes(os.urandom(4 * MIB))  # its chunks only in checkpoint 1's packs
        (v2 / "kept.img").write_bytes(kept)
        writer = open_store(url)
        writer.put(KEY, v1)
        writer.put(KEY, v2)
        one, two = manifest(writer, 1)[0], manifest(writer, 2)[0]
        only_one = {la["digest"][7:] for la in layers(one, PACK_MT)} - {la["digest"][7:] for la in layers(two, PACK_MT)}
        assert only_one, "checkpoint 1 has packs checkpoint 2 does not use"
        assert open_store(url).prune(KEY, keep=1) == [1]
        srv.stop()
        subprocess.run([Registry.BINARY, "garbage-collect", str(srv.config)], check=True, capture_output=True)
        srv.start()
        blobs = srv.root / "data/docker/registry/v2/blobs/sha256"
        for la in two["layers"]:
            assert (blobs / la["digest"][7:9] / la["digest"][7:] / "data").exists(), "GC took a listed blob"
        assert not [sha for sha in only_one if (blobs / sha[:2] / sha / "data").exists()], "GC kept dead packs"
        restores(open_store(url), tmp_path, 2, v2)
        # The writer still maps v1's chunks to the removed packs: its next commit is refused, nothing lost.
        with pytest.raises(StoreError, match="gone from the registry"):
            writer.put(KEY, v1)
        assert writer.put(KEY, v1).seq == 3
        restores(open_store(url), tmp_path, 3, v1)
        assert open_store(url).verify() == []
    finally:
        srv.stop()
