"""Hostile store contents: forged manifests (valid digests, evil contents) and decompression bombs.

A store may be written by someone else; the shim and the snapshotter read it as root. Whatever a
manifest says, get/list/latest/verify/gc/put raise only the store's own errors, never touch anything
outside the restore destination, and get falls back to the older good checkpoint.
"""

from __future__ import annotations

import copy
import json
import os
import stat
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
import zstandard

from harness.servers import SERVER_FIXTURES
from harness.store_util import (
    frame_manifest,
    host_digest,
    make_tree,
    manifest_doc,
    newest_name,
    replace_chunk,
    tree_digest,
    write_manifest,
)
from shim.store import ChunkCorrupt, Chunker, ManifestCorrupt, StoreError, open_store
from shim.store.errors import ManifestTooNew

KEY = "default/mypod/main"
ROOT = Path(__file__).resolve().parents[2]
MIB = 1 << 20


@pytest.fixture(params=["file", "s3", "az", "oci"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "file":
        return f"file://{tmp_path}/store"
    return request.getfixturevalue(SERVER_FIXTURES[request.param]).url


def make_host(root: Path) -> Path:
    """A sentinel tree standing for the node's own files, next to the restore destinations."""
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "passwd").write_text("root:x:0:0::/root:/bin/sh\n")
    os.chmod(root / "etc" / "passwd", 0o644)
    (root / "bin").mkdir()
    (root / "bin" / "tool").write_bytes(b"\x7fELF tool")
    os.chmod(root / "bin" / "tool", 0o755)
    os.chmod(root, 0o755)
    return root


def _file_like(doc: dict, path: str, **over) -> dict:
    """A file entry copying the real data of core-1.img, under another path."""
    src = next(e for e in doc["entries"] if e["path"] == "core-1.img")
    return {**copy.deepcopy(src), "path": path, **over}


def hostile_docs(good: dict, host: Path) -> dict[str, Callable[[], object]]:
    """name -> forged manifest JSON document. Each one is refused as a whole by the schema check.

    Restores go to <tmp>/restores/<dest>, built in <tmp>/restores/.<dest>.partial-*: `../../host` from
    there is the sentinel tree <tmp>/host.
    """

    def with_entries(*extra: dict, drop: str | None = None) -> dict:
        d = copy.deepcopy(good)
        d["entries"] = [e for e in d["entries"] if e["path"] != drop] + list(extra)
        return d

    def field(name: str, value: object) -> dict:
        d = copy.deepcopy(good)
        d[name] = value
        return d

    def entry_field(path: str, name: str, value: object) -> dict:
        d = copy.deepcopy(good)
        for e in d["entries"]:
            if e["path"] == path:
                if value is KeyError:
                    del e[name]
                else:
                    e[name] = value
        return d

    dir_entry = {"type": "dir", "mode": 0o777, "mtime": 0.0, "uid": 0, "gid": 0}
    return {
        "dotdot file": lambda: with_entries(_file_like(good, "../../host/etc/planted")),
        "dotdot inside": lambda: with_entries(_file_like(good, "rootfs-diff/../../../host/pwned")),
        "absolute file": lambda: with_entries(_file_like(good, str(host / "bin" / "planted"), mode=0o4777)),
        "absolute dir": lambda: with_entries({**dir_entry, "path": str(host / "etc")}),
        "host dir by dotdot": lambda: with_entries({**dir_entry, "path": "../../host"}),
        "symlink then child": lambda: with_entries(
            {**dir_entry, "path": "lnk", "type": "symlink", "target": str(host)},
            _file_like(good, "lnk/bin/tool", mode=0o6777),
        ),
        "relative symlink then dir": lambda: with_entries(
            {**dir_entry, "path": "up", "type": "symlink", "target": "../../host"},
            {**dir_entry, "path": "up/etc"},
        ),
        "symlink out of the tree": lambda: with_entries(
            {**dir_entry, "path": "shadow", "type": "symlink", "target": "/etc/shadow"}
        ),
        "symlink climbing out": lambda: with_entries(
            {**dir_entry, "path": "rootfs-diff/x", "type": "symlink", "target": "../../../host/etc"}
        ),
        "file then child": lambda: with_entries(_file_like(good, "core-1.img/x")),
        "child before its dir": lambda: with_entries(
            _file_like(good, "late/f"), {**dir_entry, "path": "late", "mode": 0o755}
        ),
        "duplicate path": lambda: with_entries(_file_like(good, "one-byte")),
        "dir over a file": lambda: with_entries({**dir_entry, "path": "one-byte"}),
        "empty component": lambda: with_entries(_file_like(good, "rootfs-diff//x")),
        "dot path": lambda: with_entries(_file_like(good, ".")),
        "NUL in path": lambda: with_entries(_file_like(good, "a\x00b")),
        "long component": lambda: with_entries(_file_like(good, "n" * 256)),
        "unknown type": lambda: with_entries({**dir_entry, "path": "fifo", "type": "fifo"}),
        "hardlink type": lambda: with_entries({**dir_entry, "path": "hl", "type": "hardlink", "target": "/etc"}),
        "list at the top": lambda: [good],
        "string at the top": lambda: "revenant.checkpoint.v1",
        "missing entries": lambda: {k: v for k, v in good.items() if k != "entries"},
        "missing key": lambda: {k: v for k, v in good.items() if k != "key"},
        "entries a dict": lambda: field("entries", {"path": "x"}),
        "entry a list": lambda: with_entries(["path", "x"]),
        "stats a list": lambda: field("stats", [1, 2]),
        "metadata a string": lambda: field("metadata", "x"),
        "seq a string": lambda: field("seq", "2"),
        "created NaN-ish": lambda: field("created", "now"),
        "mode a string": lambda: entry_field("run.sh", "mode", "0777"),
        "mode too big": lambda: entry_field("run.sh", "mode", 0o107777),
        "missing mode": lambda: entry_field("run.sh", "mode", KeyError),
        "missing chunks": lambda: entry_field("core-1.img", "chunks", KeyError),
        "uid out of range": lambda: entry_field("run.sh", "uid", 2**32 - 1),
        "negative gid": lambda: entry_field("run.sh", "gid", -5),
        "bool uid": lambda: entry_field("run.sh", "uid", True),
        "mtime past time_t": lambda: entry_field("run.sh", "mtime", 9.223372036854776e18),
        "mtime far before 1970": lambda: entry_field("run.sh", "mtime", -(2.0**62)),
        "negative size": lambda: entry_field("core-1.img", "size", -1),
        "huge size": lambda: entry_field("core-1.img", "size", 2**70),
        "chunk past the end": lambda: entry_field(
            "core-1.img", "chunks", [[0, 1900, good_digest(good)], [1900, 10, good_digest(good)]]
        ),
        "negative offset": lambda: entry_field("core-1.img", "chunks", [[-4096, 1900, good_digest(good)]]),
        "huge chunk": lambda: entry_field_multi(good, "core-1.img", size=2**40, chunks=[[0, 2**33, good_digest(good)]]),
        "digest traversal": lambda: entry_field("core-1.img", "chunks", [[0, 1900, "../../../../etc/passwd"]]),
        "chunk a dict": lambda: entry_field("core-1.img", "chunks", [{"off": 0}]),
        "too many entries": lambda: field("entries", [{}] * 1_000_001),
        "not JSON": lambda: b"\xff{not json",
        "deep nesting": lambda: b"[" * 100_000,
    }


def good_digest(doc: dict) -> str:
    return next(e for e in doc["entries"] if e["path"] == "core-1.img")["chunks"][0][2]


def entry_field_multi(good: dict, path: str, **fields) -> dict:
    d = copy.deepcopy(good)
    for e in d["entries"]:
        if e["path"] == path:
            e.update(fields)
    return d


def encode_doc(doc: object) -> bytes:
    raw = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    return frame_manifest(raw)


def test_hostile_manifests(url: str, tmp_path: Path) -> None:
    host = make_host(tmp_path / "host")
    before = host_digest(host)
    store = open_store(url)
    good_src = make_tree(tmp_path / "good", seed=70, big_mib=1)
    store.put(KEY, good_src)
    good = manifest_doc(store, KEY, newest_name(store, KEY))
    cases = hostile_docs(good, host)
    seqs = {}
    for i, (name, build) in enumerate(cases.items(), start=2):
        doc = build()
        if isinstance(doc, dict) and type(doc.get("seq")) is int:
            doc["seq"] = i  # only what the case forges is wrong, not the seq (checked on its own below)
        write_manifest(store, KEY, i, encode_doc(doc))
        seqs[i] = name
    fresh = open_store(url)
    # Listing and latest skip every forged checkpoint (and say so in the log), they do not fail.
    assert [i.seq for i in fresh.list(KEY)] == [1]
    assert [(i.key, i.seq) for i in fresh.list()] == [(KEY, 1)]
    assert fresh.latest(KEY).seq == 1 and fresh.latest(KEY, verify=True).seq == 1
    # Each forged checkpoint, asked for by seq, is refused as a damaged manifest; nothing is written.
    for s, name in seqs.items():
        dest = tmp_path / "restores" / f"d{s}"
        with pytest.raises(ManifestCorrupt):
            fresh.get(KEY, dest, seq=s)
        assert not dest.exists(), name
        assert host_digest(host) == before, f"{name} changed the host tree"
    # Without a seq, get falls back through all of them to the good checkpoint.
    info = fresh.get(KEY, tmp_path / "restores" / "fallback")
    assert info.seq == 1 and tree_digest(tmp_path / "restores" / "fallback") == tree_digest(good_src)
    problems = fresh.verify()
    assert len(problems) == len(seqs) and all("manifest" in p for p in problems), problems
    stats = fresh.gc(grace_seconds=0)
    assert len(stats["unreadable_manifests"]) == len(seqs)
    assert fresh.put(KEY, good_src).seq == len(seqs) + 2  # the key is not wedged
    info = fresh.get(KEY, tmp_path / "restores" / "after")
    assert info.seq == len(seqs) + 2 and tree_digest(tmp_path / "restores" / "after") == tree_digest(good_src)
    assert host_digest(host) == before
    assert sorted(os.listdir(tmp_path / "restores")) == ["after", "fallback"]  # no partial dirs left


def test_manifest_claiming_another_seq_is_refused(tmp_path: Path) -> None:
    """A copy of checkpoint 1 committed under the name of seq 2 must not pass for either."""
    store = open_store(f"file://{tmp_path}/store")
    src = make_tree(tmp_path / "src", seed=75, big_mib=1)
    store.put(KEY, src)
    write_manifest(store, KEY, 2, encode_doc(manifest_doc(store, KEY, newest_name(store, KEY))))
    with pytest.raises(ManifestCorrupt, match="seq"):
        store.get(KEY, tmp_path / "d", seq=2)
    assert [i.seq for i in store.list(KEY)] == [1] and store.latest(KEY).seq == 1


def test_gc_leaves_a_store_with_a_newer_format_alone(tmp_path: Path) -> None:
    """A checkpoint written by a newer revenant names chunks this one cannot see: gc must not sweep them."""
    store = open_store(f"file://{tmp_path}/store")
    src = make_tree(tmp_path / "src", seed=76, big_mib=1)
    store.put(KEY, src)
    newer = manifest_doc(store, KEY, newest_name(store, KEY))
    newer["seq"], newer["format"] = 2, "revenant.checkpoint.v9"
    write_manifest(store, KEY, 2, encode_doc(newer))
    store.delete(KEY, 1)  # now only the newer checkpoint references the chunks
    stats = store.gc(grace_seconds=0)
    assert stats["chunks_deleted"] == 0 and "newer than this revenant" in stats["skipped"], stats
    with pytest.raises(ManifestTooNew, match="upgrade"):
        store.get(KEY, tmp_path / "d", seq=2)
    # Damage, unlike a newer format, does not stop gc: the unreadable checkpoint is reported and swept.
    write_manifest(store, KEY, 2, encode_doc({"format": "revenant.checkpoint.v1x"}))
    stats = store.gc(grace_seconds=0)
    assert stats["chunks_deleted"] > 0 and len(stats["unreadable_manifests"]) == 1, stats


ESCAPES = [
    "dotdot file",
    "dotdot inside",
    "absolute file",
    "absolute dir",
    "host dir by dotdot",
    "symlink then child",
    "relative symlink then dir",
    "file then child",
    "digest traversal",
]


@pytest.mark.parametrize("case", ESCAPES)
def test_escape_attempt_alone(case: str, tmp_path: Path) -> None:
    """Each path attack on its own, asked for by seq: refused, the host tree untouched."""
    host = make_host(tmp_path / "host")
    before = host_digest(host)
    store = open_store(f"file://{tmp_path}/store")
    store.put(KEY, make_tree(tmp_path / "good", seed=76, big_mib=1))
    doc = hostile_docs(manifest_doc(store, KEY, newest_name(store, KEY)), host)[case]()
    doc["seq"] = 2
    write_manifest(store, KEY, 2, encode_doc(doc))
    with pytest.raises(ManifestCorrupt):
        store.get(KEY, tmp_path / "restores" / "dest", seq=2)
    assert host_digest(host) == before
    assert not os.path.exists(tmp_path / "restores" / "dest")


def test_restore_masks_modes_and_owners(tmp_path: Path) -> None:
    """A valid manifest asking for setuid/setgid, world-writable modes and other owners."""
    store = open_store(f"file://{tmp_path}/store")
    src = make_tree(tmp_path / "src", seed=71, big_mib=1)
    store.put(KEY, src)
    doc = manifest_doc(store, KEY, newest_name(store, KEY))
    for e in doc["entries"]:
        if e["path"] == "run.sh":
            e.update(mode=0o6777, uid=0, gid=0)
        elif e["path"] == "rootfs-diff":
            e.update(mode=0o1777, uid=1234, gid=5678)
        elif e["path"] == "core-1.img":
            e.update(mode=0o666, uid=4321, gid=4321)
    doc["seq"] = 2
    write_manifest(store, KEY, 2, encode_doc(doc))
    dest = tmp_path / "dest"
    assert store.get(KEY, dest).seq == 2
    modes = {p: stat.S_IMODE(os.lstat(dest / p).st_mode) for p in ("run.sh", "rootfs-diff", "core-1.img")}
    assert modes == {"run.sh": 0o755, "rootfs-diff": 0o755, "core-1.img": 0o644}
    assert stat.S_IMODE(os.lstat(dest).st_mode) == 0o700
    if os.geteuid() == 0:
        assert (os.lstat(dest / "rootfs-diff").st_uid, os.lstat(dest / "rootfs-diff").st_gid) == (1234, 5678)
        assert os.lstat(dest / "core-1.img").st_uid == 4321


def test_restore_refuses_a_destination_with_contents(tmp_path: Path) -> None:
    store = open_store(f"file://{tmp_path}/store")
    store.put(KEY, make_tree(tmp_path / "src", seed=72, big_mib=1))
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep").write_text("mine")
    with pytest.raises(StoreError, match="not empty"):
        store.get(KEY, busy)
    assert os.listdir(busy) == ["keep"] and (busy / "keep").read_text() == "mine"
    (tmp_path / "target").mkdir()
    os.symlink(tmp_path / "target", tmp_path / "via-link")
    with pytest.raises(StoreError, match="not a directory"):
        store.get(KEY, tmp_path / "via-link")
    assert os.listdir(tmp_path / "target") == []
    assert not [n for n in os.listdir(tmp_path) if ".partial-" in n]


def test_put_refuses_a_tree_it_could_not_restore(tmp_path: Path) -> None:
    store = open_store(f"file://{tmp_path}/store")
    src = make_tree(tmp_path / "src", seed=73, big_mib=1)
    os.symlink("/etc/passwd", src / "escape")
    with pytest.raises(StoreError, match="absolute"):
        store.put(KEY, src)
    assert store.list(KEY) == []


# ---------------------------------------------------------------------------------- decompression bombs

BOMB_CHILD = textwrap.dedent("""
    import sys
    from pathlib import Path
    sys.path.insert(0, sys.argv[1])
    from harness.store_util import rss_peak_reset, rss_peak
    from shim.store import open_store, StoreError
    store = open_store(sys.argv[2])
    store.latest("warm/up")  # imports and a connection before the baseline; reads no manifest
    base = rss_peak_reset()
    try:
        store.get(sys.argv[3], Path(sys.argv[4]), seq=int(sys.argv[5]), fallback=False)
        outcome = "restored"
    except StoreError as e:
        outcome = type(e).__name__
    print(outcome, rss_peak() - base)
""")


def zstd_bomb(size: int) -> bytes:
    """A zstd frame that declares (and really holds) `size` zero bytes, built without holding them."""
    import io

    out = io.BytesIO()
    with zstandard.ZstdCompressor(level=3).stream_writer(out, size=size, closefd=False) as w:
        zeros = bytes(MIB)
        for _ in range(size // MIB):
            w.write(zeros)
    return out.getvalue()


def _get_in_child(url: str, dest: Path, seq: int) -> tuple[str, int]:
    p = subprocess.run(
        [sys.executable, "-c", BOMB_CHILD, str(ROOT / "tests"), url, KEY, str(dest), str(seq)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr
    outcome, grew = p.stdout.split()
    return outcome, int(grew)


@pytest.mark.parametrize("backend", ["file", "s3", "az"])
def test_chunk_bomb_refused_with_bounded_memory(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    srv = request.getfixturevalue(SERVER_FIXTURES[backend]) if backend != "file" else None
    url = srv.url if srv else f"file://{tmp_path}/store?packs=0"
    store = open_store(url, chunker=Chunker.parse("fixed:65536"))
    src = tmp_path / "src"
    src.mkdir()
    (src / "pages-1.img").write_bytes(os.urandom(64 << 10))
    store.put(KEY, src)
    digest = manifest_doc(store, KEY, newest_name(store, KEY))["entries"][0]["chunks"][0][2]
    bomb = bytes([1]) + zstd_bomb(256 * MIB)  # CHUNK_ZSTD + a frame declaring 256 MiB
    assert len(bomb) < 64 << 10
    replace_chunk(store, srv, digest, bomb)
    outcome, grew = _get_in_child(url, tmp_path / "dest", 1)
    assert outcome == "ChunkCorrupt"
    assert grew < (64 << 10) + 32 * MIB, f"peak RSS grew by {grew >> 20} MiB decoding a 64 KiB chunk"
    with pytest.raises(ChunkCorrupt, match="declares"):
        store.get(KEY, tmp_path / "dest2", fallback=False)


@pytest.mark.parametrize("backend", ["file", "s3", "az"])
def test_manifest_bomb_refused_with_bounded_memory(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    url = request.getfixturevalue(SERVER_FIXTURES[backend]).url if backend != "file" else f"file://{tmp_path}/store"
    store = open_store(url)
    store.put(KEY, make_tree(tmp_path / "src", seed=74, big_mib=1))
    write_manifest(store, KEY, 2, frame_manifest(payload=zstd_bomb(256 * MIB)))
    outcome, grew = _get_in_child(url, tmp_path / "dest", 2)
    assert outcome == "ManifestCorrupt"
    assert grew < 32 * MIB, f"peak RSS grew by {grew >> 20} MiB reading a forged manifest"
    assert store.get(KEY, tmp_path / "dest2").seq == 1
    assert [i.seq for i in store.list(KEY)] == [1]


FD_CHILD = textwrap.dedent("""
    import resource, sys
    from pathlib import Path
    resource.setrlimit(resource.RLIMIT_NOFILE, (128, 128))
    from shim.store import open_store
    print(open_store(sys.argv[1]).get(sys.argv[2], Path(sys.argv[3])).files)
""")


def test_restore_of_many_files_holds_few_descriptors(tmp_path: Path) -> None:
    """A manifest may list a million files: restore keeps a bounded number open, not one per file."""
    src = tmp_path / "src"
    src.mkdir()
    for i in range(400):
        (src / f"f{i:04d}").write_bytes(os.urandom(100))
    url = f"file://{tmp_path}/store"
    open_store(url).put(KEY, src)
    p = subprocess.run(
        [sys.executable, "-c", FD_CHILD, url, KEY, str(tmp_path / "dest")], capture_output=True, text=True, timeout=120
    )
    assert p.returncode == 0 and p.stdout.strip() == "400", p.stderr[-1000:]
    assert tree_digest(tmp_path / "dest") == tree_digest(src)
