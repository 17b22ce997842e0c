"""Packs on the S3 (real SeaweedFS) and Azure (Azurite) stores: crash mid-pack, lost indexes rebuilt from
trailers, failing background uploads, gc deleting and rewriting packs, stores written before packs, hostile
trailers and indexes."""

from __future__ import annotations

import logging
import os
import shutil
import struct
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from harness.servers import SERVER_FIXTURES, ServerHandle
from harness.store_util import MIB, gc_when_locks_stale, make_tree, mutate, tree_digest
from shim.store import BackendUnavailable, ChunkCorrupt, StoreError, open_store
from shim.store.backends.base import Damaged
from shim.store.backends.packs import (
    ENTRY,
    FOOTER,
    REPACK_SHARE,
    decode_index,
    decode_trailer,
    encode_index,
    encode_trailer,
    pack_name,
)
from shim.store.limits import MAX_PACK_OBJECT

KEY = "default/mypod/main"
ROOT = Path(__file__).resolve().parents[2]

CHILD = textwrap.dedent("""
    import sys
    from pathlib import Path
    sys.path.insert(0, sys.argv[1])
    from shim.store import open_store
    open_store(sys.argv[2]).put(sys.argv[3], Path(sys.argv[4]))
""")


@pytest.fixture(params=["s3", "az"])
def remote(request: pytest.FixtureRequest) -> ServerHandle:
    """The packing object stores: s3:// and az:// (ObjectBackend)."""
    return request.getfixturevalue(SERVER_FIXTURES[request.param])


def objects(store, sub: str) -> dict[str, int]:
    return {name: size for name, size, _mtime in store.backend.list_objects(sub)}


def live_digests(store) -> set[str]:
    out: set[str] = set()
    for info in store.list(KEY):
        out |= store._load(KEY, info.name).chunk_digests()
    return out


def pack_contents(store) -> dict[str, list[tuple[str, int, int]]]:
    """pack id -> entries, read from the packs' own trailers."""
    b = store.backend
    out = {}
    for name in objects(store, "packs/"):
        raw = b.get_object(name, MAX_PACK_OBJECT)
        out[name.rsplit("/", 1)[-1]] = decode_trailer(raw, len(raw), name)
    return out


def restores(store, tmp_path: Path, seq: int, tree: Path) -> None:
    dest = tmp_path / f"r{seq}-{time.monotonic_ns()}"
    store.get(KEY, dest, seq=seq, fallback=False)
    assert tree_digest(dest) == tree_digest(tree)


def test_packs_hold_many_chunks(remote, tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src", seed=1, big_mib=8)
    store = open_store(remote.url + "&pack_mb=1")
    info = store.put(KEY, src)
    packs = objects(store, "packs/")
    assert objects(store, "chunks/") == {}, "a packed store writes no per-chunk object"
    assert 2 <= len(packs) < info.chunks_new / 4, (len(packs), info.chunks_new)
    assert len(objects(store, "index/")) == 1  # one index per flush
    assert max(packs.values()) < 2 * MIB  # sealed once past 1 MiB: one chunk over at most
    restores(open_store(remote.url), tmp_path, 1, src)


@pytest.mark.parametrize("value", ["0", "257", "1.5", "lots"])
def test_pack_size_is_bounded(remote, value: str) -> None:
    with pytest.raises(StoreError, match="pack_mb"):
        open_store(remote.url + f"&pack_mb={value}")


def test_crash_mid_pack_leaves_garbage_that_gc_removes(remote, tmp_path: Path) -> None:
    url = remote.url + "&pack_mb=1"
    v1 = make_tree(tmp_path / "v1", seed=2, big_mib=4)
    store = open_store(url)
    store.put(KEY, v1)
    before = set(objects(store, "packs/"))
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "pages-1.img").write_bytes(os.urandom(6 * MIB))
    env = dict(os.environ, REVENANT_SNAPSHOTTER_CRASH_AT="store.pack.after-upload")
    child = subprocess.run([sys.executable, "-c", CHILD, str(ROOT), url, KEY, str(v2)], env=env, timeout=300)
    assert child.returncode == -9
    orphans = set(objects(store, "packs/")) - before
    assert orphans, "the killed put stored a pack"
    fresh = open_store(url)
    assert [i.seq for i in fresh.list(KEY)] == [1]
    restores(fresh, tmp_path, 1, v1)
    stats = gc_when_locks_stale(url)
    assert stats.get("interrupted") is None, stats
    assert not orphans & set(objects(store, "packs/")), "gc left the dead writer's pack"
    final = open_store(url)
    assert final.verify() == []
    restores(final, tmp_path, 1, v1)
    # Every pack left holds a chunk a checkpoint names.
    live = live_digests(final)
    for pack, entries in pack_contents(final).items():
        assert any(d in live for d, _o, _n in entries), pack


def test_lost_index_rebuilt_from_pack_trailers(remote, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    url = remote.url + "&pack_mb=1"
    src = make_tree(tmp_path / "src", seed=3, big_mib=6)
    store = open_store(url)
    store.put(KEY, src)
    b = store.backend
    for name in objects(store, "index/"):
        b.delete_object(name)
    with caplog.at_level(logging.WARNING):
        reader = open_store(url)
        restores(reader, tmp_path, 1, src)
    assert "rebuilt the index" in caplog.text
    rebuilt = objects(store, "index/")
    assert len(rebuilt) == 1, "the rebuilt index is stored for the next reader"
    covered = decode_index(b.get_object(next(iter(rebuilt)), 1 << 30), "index")
    assert set(covered) == set(pack_contents(store))
    # A damaged index is no worse than a lost one.
    name = next(iter(rebuilt))
    b.put_object(name, b"RVNTIDX1" + struct.pack("<I", 5) + b"\xff" * 40)
    assert open_store(url).verify() == []


def test_failing_background_upload_commits_nothing_and_retry_succeeds(remote, tmp_path: Path) -> None:
    url = remote.url + "&pack_mb=1"
    v1 = make_tree(tmp_path / "v1", seed=4)
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
            remote.stop()

    with pytest.raises(BackendUnavailable, match=r"upload pack \w+ failed after 3 attempts"):
        store.put(KEY, v2, progress=stop_midway)
    remote.start()
    fresh = open_store(url)
    assert [i.seq for i in fresh.list(KEY)] == [1], "a failed put must commit nothing"
    restores(fresh, tmp_path, 1, v1)
    info = store.put(KEY, v2)  # the same store object: the failure is not sticky
    assert info.seq == 2
    restores(open_store(url), tmp_path, 2, v2)
    assert open_store(url).verify() == []


def test_manifest_never_names_a_chunk_whose_pack_failed(remote, tmp_path: Path) -> None:
    store = open_store(remote.url + "&pack_mb=1")
    b = store.backend
    src = make_tree(tmp_path / "src", seed=5)
    chunks = {"0" * 63 + "1"}
    with pytest.raises(StoreError, match="not stored"):
        b.put_manifest(KEY, "0000000001-x", b"{}", chunks)
    assert objects(store, "manifests/") == {}
    assert store.put(KEY, src).seq == 1


def test_gc_deletes_dead_packs_and_rewrites_partly_dead_ones(remote, tmp_path: Path) -> None:
    url = remote.url + "&pack_mb=1"
    store = open_store(url)
    trees = {}
    v = make_tree(tmp_path / "v1", seed=6, big_mib=8)
    trees[store.put(KEY, v).seq] = v
    for seq in (2, 3):
        nxt = tmp_path / f"v{seq}"
        shutil.copytree(v, nxt, symlinks=True)
        mutate(nxt / "pages-1.img", 0.3, seed=seq)
        v = nxt
        trees[store.put(KEY, v).seq] = v
    before = pack_contents(store)
    bytes_before = sum(objects(store, "packs/").values())
    store.delete(KEY, 1)
    stats = store.gc(grace_seconds=0)
    assert stats.get("interrupted") is None and stats["chunks_deleted"] > 0, stats
    after = pack_contents(store)
    live = live_digests(store)
    gone, new = set(before) - set(after), set(after) - set(before)
    assert gone and new, "some packs were removed and some rewritten"
    assert sum(objects(store, "packs/").values()) < bytes_before
    rewritten = [p for p in gone if any(d in live for d, _o, _n in before[p])]
    assert rewritten, "a partly dead pack was rewritten"
    for p in rewritten:  # its live chunks now live in a new pack
        moved = {d for d, _o, _n in before[p] if d in live}
        assert moved <= {d for q in new for d, _o, _n in after[q]}
    for p, entries in after.items():  # no pack left over the repack threshold
        dead = sum(n for d, _o, n in entries if d not in live)
        assert dead < REPACK_SHARE * sum(n for _d, _o, n in entries), p
    # Indexes name only packs that exist.
    b = store.backend
    for name in objects(store, "index/"):
        assert set(decode_index(b.get_object(name, 1 << 30), name)) <= set(after)
    fresh = open_store(url)
    assert fresh.verify() == []
    for seq in (2, 3):
        restores(fresh, tmp_path, seq, trees[seq])
    assert fresh.put(KEY, trees[3]).chunks_new == 0


def test_store_written_before_packs_stays_readable(remote, tmp_path: Path) -> None:
    v1 = make_tree(tmp_path / "v1", seed=7, big_mib=4)
    old = open_store(remote.url + "&packs=0")
    old.put(KEY, v1)
    loose = objects(old, "chunks/")
    assert loose
    store = open_store(remote.url)
    restores(store, tmp_path, 1, v1)
    v2 = tmp_path / "v2"
    shutil.copytree(v1, v2, symlinks=True)
    mutate(v2 / "pages-1.img", 0.2, seed=8)
    info = store.put(KEY, v2)
    assert info.chunks_new < info.chunks_total / 2, "dedup against the per-chunk objects"
    assert objects(store, "packs/")
    store.delete(KEY, 1)
    assert store.gc(grace_seconds=0).get("interrupted") is None
    assert len(objects(store, "chunks/")) < len(loose), "gc deletes unreferenced per-chunk objects"
    assert store.verify() == []
    restores(store, tmp_path, 2, v2)


def test_hostile_trailers_rejected() -> None:
    good = [("ab" * 32, 0, 10), ("cd" * 32, 10, 5)]
    pack = b"x" * 15 + encode_trailer(good)
    assert decode_trailer(pack, len(pack), "p") == good
    for entries, match in [
        ([("ab" * 32, 10, 10)], "outside"),
        ([("ab" * 32, 2**63, 10)], "outside"),
        ([("ab" * 32, 0, 0)], "outside"),
    ]:
        forged = b"x" * 15 + encode_trailer(entries)
        with pytest.raises(Damaged, match=match):
            decode_trailer(forged, len(forged), "p")
    huge = b"x" * 15 + FOOTER.pack(2**31, 1, b"RVNTPACK")
    with pytest.raises(Damaged, match="claims 2147483648 chunks"):
        decode_trailer(huge, len(huge), "p")
    many = b"x" * 15 + FOOTER.pack(1000, 1, b"RVNTPACK")
    with pytest.raises(Damaged, match="larger than the pack"):
        decode_trailer(many, len(many), "p")
    with pytest.raises(Damaged, match="bad magic"):
        decode_trailer(b"x" * 40, 40, "p")
    with pytest.raises(Damaged, match="version 7"):
        decode_trailer(b"x" * 15 + FOOTER.pack(0, 7, b"RVNTPACK"), 31, "p")
    idx = encode_index([("11" * 16, good)])
    assert decode_index(idx, "i") == {"11" * 16: good}
    for forged, match in [
        (idx[:-3], "claims|cut short"),
        (idx + b"\0", "after its last pack"),
        (encode_index([("11" * 16, [("ab" * 32, 2**40, 5)])]), "cannot be in a pack"),
        (encode_index([("11" * 16, [("ab" * 32, 0, 1 << 30)])]), "cannot be in a pack"),
        (b"RVNTIDX1" + struct.pack("<I", 2**31), "cut short"),
        (b"NOTINDEX" + bytes(4), "bad magic"),
    ]:
        with pytest.raises(Damaged, match=match):
            decode_index(forged, "i")
    assert ENTRY.size == 44


def test_hostile_pack_in_the_store_fails_clearly(remote, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    url = remote.url + "&pack_mb=1"
    src = make_tree(tmp_path / "src", seed=9, big_mib=2)
    store = open_store(url)
    store.put(KEY, src)
    b = store.backend
    (iname,) = objects(store, "index/")
    content = decode_index(b.get_object(iname, 1 << 30), iname)
    pack, entries = next(iter(content.items()))
    d, _o, n = entries[0]
    # An index pointing past its pack's end, or past any pack's size: not used, the pack's own trailer is.
    for offset, complaint in [(100 << 20, "lists chunks outside pack"), (900 << 20, "cannot be in a pack")]:
        content[pack] = [(d, offset, n), *entries[1:]]
        b.put_object(iname, encode_index(sorted(content.items())))
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            restores(open_store(url), tmp_path, 1, src)
        assert complaint in caplog.text
    # A pack whose trailer lies too (an offset past its data), with no index: refused, named in the log,
    # and the restore fails on the chunk it cannot find.
    for name in objects(store, "index/"):
        b.delete_object(name)
    raw = b.get_object(pack_name(pack), MAX_PACK_OBJECT)
    last = decode_trailer(raw, len(raw), pack)[-1][0]
    forged = raw[: -FOOTER.size - ENTRY.size] + ENTRY.pack(bytes.fromhex(last), len(raw), n) + raw[-FOOTER.size :]
    b.put_object(pack_name(pack), forged)
    caplog.clear()
    with caplog.at_level(logging.WARNING), pytest.raises(ChunkCorrupt, match="is missing"):
        open_store(url).get(KEY, tmp_path / "d2", fallback=False)
    assert f"pack {pack} has no usable index and its trailer is refused" in caplog.text
    assert "lies outside" in caplog.text


GC_CHILD = textwrap.dedent("""
    import sys
    sys.path.insert(0, sys.argv[1])
    from shim.store import open_store
    open_store(sys.argv[2]).gc(grace_seconds=0)
""")


def test_gc_killed_between_rewrite_and_delete_leaves_copies_the_next_gc_removes(remote, tmp_path: Path) -> None:
    url = remote.url + "&pack_mb=1"
    store = open_store(url)
    v1 = make_tree(tmp_path / "v1", seed=10, big_mib=6)
    store.put(KEY, v1)
    v2 = tmp_path / "v2"
    shutil.copytree(v1, v2, symlinks=True)
    mutate(v2 / "pages-1.img", 0.4, seed=11)
    store.put(KEY, v2)
    store.delete(KEY, 1)
    before = set(pack_contents(store))
    env = dict(os.environ, REVENANT_SNAPSHOTTER_CRASH_AT="store.gc.before-unlink")
    child = subprocess.run([sys.executable, "-c", GC_CHILD, str(ROOT), url], env=env, timeout=300)
    assert child.returncode == -9
    middle = pack_contents(store)
    assert set(middle) > before, "the rewrite stored new packs and removed nothing yet"
    copies = [d for p in set(middle) - before for d, _o, _n in middle[p]]
    assert copies
    assert gc_when_locks_stale(url).get("interrupted") is None
    after = pack_contents(store)
    seen: dict[str, str] = {}
    for pack, entries in after.items():
        for d, _o, _n in entries:
            assert d not in seen, f"chunk {d} is stored in {seen[d]} and {pack}"
            seen[d] = pack
    assert set(copies) & live_digests(store) <= set(seen)
    final = open_store(url)
    assert final.verify() == []
    restores(final, tmp_path, 2, v2)
