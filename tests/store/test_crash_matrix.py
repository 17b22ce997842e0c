"""The store's crash matrix: a put or a gc SIGKILLed at each step (shim.faults crash points, set by
environment in a child process), then put/get/gc/verify work and the previous checkpoint is intact;
and a long-lived process leaks no file descriptor across failing operations."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from harness.store_util import corrupt_chunk, gc_when_locks_stale, make_tree, mutate, tree_digest
from shim.store import CheckpointNotFound, Fenced, StoreError, open_store

KEY = "default/mypod/main"
ROOT = Path(__file__).resolve().parents[2]

CHILD = textwrap.dedent("""
    import sys
    from pathlib import Path
    sys.path.insert(0, sys.argv[1])
    from shim.store import open_store
    store = open_store(sys.argv[2])
    if sys.argv[3] == "put":
        store.put(sys.argv[4], Path(sys.argv[5]))
    else:
        store.prune(sys.argv[4], keep=1)
        print(store.gc(grace_seconds=0))
""")

PUT_FILE = [
    "store.pack.after-append",
    "store.pack.after-fsync",
    "store.index.before-rename",
    "store.index.after-rename",
    "store.pack.after-index",
    "store.put.before-manifest",
    "store.manifest.before-rename",
    "store.manifest.after-rename",
    "store.put.after-manifest",
]
PUT_LOOSE = ["store.put.after-chunk", "store.put.before-manifest", "store.manifest.before-rename"]
PUT_S3 = [
    "store.pack.after-append",
    "store.pack.after-upload",
    "store.index.before-upload",
    "store.index.after-upload",
    "store.put.before-manifest",
    "store.put.after-manifest",
]
PUT_S3_LOOSE = ["store.put.after-chunk", "store.put.before-manifest"]
GC_S3 = [
    "store.gc.after-delete",
    "store.gc.mid-rewrite",
    "store.pack.after-upload",
    "store.index.after-upload",
    "store.gc.before-unlink",
    "store.gc.after-pack-delete",
    "store.gc.before-index-delete",
]
GC_FILE = [
    "store.gc.after-delete",
    "store.gc.mid-rewrite",
    "store.pack.after-fsync",
    "store.index.after-rename",
    "store.gc.before-unlink",
    "store.gc.after-idx-unlink",
]
CASES = (
    [("file", "put", p) for p in PUT_FILE]
    + [("file-loose", "put", p) for p in PUT_LOOSE]
    + [("s3", "put", p) for p in PUT_S3]
    + [("s3-loose", "put", p) for p in PUT_S3_LOOSE]
    + [("file", "gc", p) for p in GC_FILE]
    + [("s3", "gc", p) for p in GC_S3]
    + [("file-loose", "gc", "store.gc.after-delete"), ("s3-loose", "gc", "store.gc.after-delete")]
    # gs:// is the S3 code above another client: a few points through it (SeaweedFS as the server).
    + [("gs", "put", p) for p in ("store.pack.after-upload", "store.put.before-manifest")]
    + [("gs", "gc", "store.gc.mid-rewrite")]
    # az:// shares s3://'s object layer (ObjectBackend, packs): the same points, on Azurite.
    + [("az", "put", p) for p in PUT_S3]
    + [("az-loose", "put", p) for p in PUT_S3_LOOSE]
    + [("az", "gc", p) for p in GC_S3]
    + [("az-loose", "gc", "store.gc.after-delete")]
)


def store_url(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    if backend == "file":
        return f"file://{tmp_path}/store"
    if backend == "file-loose":
        return f"file://{tmp_path}/store?packs=0"
    fixture = {"gs": "gs_server"}.get(backend, "azure_server" if backend.startswith("az") else "s3_server")
    url = request.getfixturevalue(fixture).url
    # 1 MiB packs: several per put, so a gc both deletes whole packs and rewrites partly dead ones.
    return url + ("&packs=0" if backend.endswith("-loose") else "&pack_mb=1")


@pytest.mark.parametrize(("backend", "op", "point"), CASES, ids=[f"{b}-{o}-{p}" for b, o, p in CASES])
def test_killed_at_each_step(backend: str, op: str, point: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    url = store_url(backend, tmp_path, request)
    v1 = make_tree(tmp_path / "v1", seed=1, big_mib=8)
    store = open_store(url)
    store.put(KEY, v1)
    v2 = tmp_path / "v2"
    shutil.copytree(v1, v2, symlinks=True)
    mutate(v2 / "pages-1.img", 0.3, seed=2)  # shares packs with v1: a gc must rewrite them
    store.put(KEY, v2)
    v3 = tmp_path / "v3"
    shutil.copytree(v2, v3, symlinks=True)
    mutate(v3 / "pages-1.img", 0.3, seed=3)
    args = [str(ROOT), url, op, KEY] + ([str(v3)] if op == "put" else [])
    env = dict(os.environ, REVENANT_SNAPSHOTTER_CRASH_AT=point)
    child = subprocess.run([sys.executable, "-c", CHILD, *args], env=env, capture_output=True, timeout=300)
    assert child.returncode == -9, f"{point} never reached: rc {child.returncode} {child.stderr.decode()[-2000:]}"

    fresh = open_store(url)
    seqs = [i.seq for i in fresh.list(KEY)]
    trees = {1: v1, 2: v2, 3: v3}
    if op == "put":  # a put killed after its manifest landed committed v3 whole; before, nothing
        assert seqs in ([1, 2], [1, 2, 3]), seqs
        assert (seqs == [1, 2, 3]) == (point in ("store.manifest.after-rename", "store.put.after-manifest"))
    else:
        assert seqs == [2], seqs  # the prune ran before the gc
    assert fresh.verify() == [], "a checkpoint lost data"
    for seq in seqs:
        fresh.get(KEY, tmp_path / f"r{seq}", seq=seq, fallback=False)
        assert tree_digest(tmp_path / f"r{seq}") == tree_digest(trees[seq])
    after = fresh.put(KEY, v3)
    assert gc_when_locks_stale(url).get("interrupted") is None
    final = open_store(url)
    assert final.verify() == []
    final.get(KEY, tmp_path / "last", seq=after.seq, fallback=False)
    assert tree_digest(tmp_path / "last") == tree_digest(v3)
    if backend.startswith("file"):
        final.claim(KEY, "node-b")  # an epoch file too
        root = tmp_path / "store"
        for dirpath, _dirnames, filenames in os.walk(root):
            assert stat.S_IMODE(os.stat(dirpath).st_mode) == 0o700, dirpath
            for f in filenames:
                assert stat.S_IMODE(os.lstat(Path(dirpath) / f).st_mode) == 0o600, Path(dirpath) / f


def fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_no_fd_leak_across_failing_operations(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"file://{tmp_path}/store"
    big = tmp_path / "big"
    big.mkdir()
    (big / "pages-1.img").write_bytes(os.urandom(40 << 20))  # more than two packs
    v1 = make_tree(tmp_path / "v1", seed=4, big_mib=2)
    store = open_store(url)
    store.put(KEY, v1)
    store.get(KEY, tmp_path / "warm")  # thread pools and lazily opened things exist from here on
    epoch = store.claim(KEY, "a")
    initial = fds()
    steady = initial + 1  # a failed put may leave the pack it was filling open, for the next put to fill

    def fail_midway(done: int, total: int) -> None:
        if done > 36 << 20:
            raise RuntimeError("stop here")

    for i in range(4):
        with pytest.raises(RuntimeError, match="stop here"):
            store.put(KEY, big, progress=fail_midway)  # fails with packs written, not sealed
        with pytest.raises(CheckpointNotFound):
            store.get("no/such/key", tmp_path / f"x{i}")
        with pytest.raises(StoreError, match="not empty"):
            store.get(KEY, tmp_path / "warm")
        open_store(url).claim(KEY, f"b{i}")
        with pytest.raises(Fenced):
            store.put(KEY, v1, epoch=epoch)
        assert fds() <= steady, f"round {i}: {fds()} fds open, {initial} before"
    info = store.put(KEY, v1)
    bad = sorted(store._load(KEY, info.name).chunk_digests())[0]
    corrupt_chunk(store, None, bad)
    for i in range(3):
        with pytest.raises(StoreError):
            store.get(KEY, tmp_path / f"c{i}", fallback=False)
        assert fds() <= steady
    store.close()
    assert fds() <= initial
    assert not [p for p in (tmp_path / "store" / "packs").iterdir() if not (p.with_suffix(".idx")).exists()]
