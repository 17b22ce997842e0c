"""Locks and gc on real file, S3 (SeaweedFS) and Azure (Azurite) stores: puts never wait for gc, gc never
takes a chunk a committed checkpoint needs, lapsed locks stop their put, liveness ignores the writer's clock."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from harness.store_util import make_tree, short_stale, tree_digest
from shim.store import open_store
from shim.store.errors import LockLost
from shim.store.locks import LockWatcher

KEY = "default/mypod/main"
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(params=["file", "file-loose", "s3", "az", "gs"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "file":
        return f"file://{tmp_path}/store"
    if request.param == "file-loose":
        return f"file://{tmp_path}/store?packs=0"
    return request.getfixturevalue({"az": "azure_server", "gs": "gs_server"}.get(request.param, "s3_server")).url


def two_checkpoints_one_pruned(url: str, tmp_path: Path) -> tuple[Path, Path]:
    """Checkpoints of trees a then b, a's pruned: a's own chunks are garbage a gc may sweep."""
    a = make_tree(tmp_path / "a", seed=1, big_mib=8)
    b = make_tree(tmp_path / "b", seed=2, big_mib=8)
    store = open_store(url)
    store.put(KEY, a)
    store.put(KEY, b)
    assert store.prune(KEY, keep=1) == [1]
    return a, b


def gc_lock_names(url: str) -> list[str]:
    return [n for n, _ in open_store(url).backend.list_locks() if n.startswith("gc-")]


GC = textwrap.dedent("""
    import sys
    sys.path.insert(0, sys.argv[1])
    from shim.store import open_store
    print(open_store(sys.argv[2], lock_stale=600).gc(grace_seconds=0), flush=True)
""")


def test_killed_gc_leaves_puts_that_succeed_at_once(url: str, tmp_path: Path) -> None:
    a, _b = two_checkpoints_one_pruned(url, tmp_path)
    env = dict(os.environ, REVENANT_FAULT_DELAY="store.gc.mark=0.5,store.gc.sweep=0.5")
    gc = subprocess.Popen([sys.executable, "-c", GC, str(ROOT), url], env=env, stdout=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not gc_lock_names(url):
            assert gc.poll() is None, "gc ended before it was killed"
            assert time.monotonic() < deadline, "gc never took its lock"
            time.sleep(0.01)
    finally:
        gc.send_signal(signal.SIGKILL)
        gc.wait()
    assert gc_lock_names(url), "the killed gc's lock stays behind"
    # A put with a stale time of 600 s used to wait up to 600 s for that lock; now it does not look.
    done: list = []
    put = threading.Thread(target=lambda: done.append(open_store(url, lock_stale=600).put(KEY, a)))
    put.start()
    put.join(timeout=120)
    assert not put.is_alive(), "the put waited for the dead gc"
    assert done and done[0].seq == 3
    store = open_store(url)
    assert store.verify() == []
    store.get(KEY, tmp_path / "r", seq=3)
    assert tree_digest(tmp_path / "r") == tree_digest(a)


def test_long_gc_concurrent_with_puts_loses_no_chunk(url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a, _b = two_checkpoints_one_pruned(url, tmp_path)
    # A gc far longer than the stale time (its lock must stay live by heartbeat), then puts that reuse
    # exactly the chunks it is about to sweep. Not the 1 s short_stale: the gc holds its lock by heartbeat
    # every quarter of the stale time, and on a loaded machine a 250 ms beat can miss (LockLost, no stats).
    stale = 3.0
    monkeypatch.setenv("REVENANT_FAULT_DELAY", f"store.gc.mark={stale + 0.5},store.gc.sweep=0.05")
    stats: list = []
    gc = threading.Thread(target=lambda: stats.append(open_store(url, lock_stale=stale).gc(grace_seconds=0)))
    gc.start()
    try:
        time.sleep(stale + 0.6)  # past the stale time: the old code let puts run and dedup against the sweep
        writer = open_store(url, lock_stale=stale)
        infos = [writer.put(KEY, a)]
        while gc.is_alive() and len(infos) < 20:
            infos.append(writer.put(KEY, a))
    finally:
        gc.join()
    assert stats and "skipped" not in stats[0], stats
    store = open_store(url)
    assert store.verify() == [], "a committed checkpoint lost chunks to gc"
    for info in infos:
        dest = tmp_path / f"r{info.seq}"
        store.get(KEY, dest, seq=info.seq, fallback=False)
        assert tree_digest(dest) == tree_digest(a)
    # With the writers gone the garbage does go.
    store.prune(KEY, keep=1)
    assert store.gc(grace_seconds=0)["chunks_deleted"] > 0
    assert store.verify() == []


def test_put_replaces_reused_chunks_a_gc_swept(url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Defence in depth: a gc that (misconfigured with a much shorter stale time) took a slow put's lock
    for dead and swept chunks the put had reused; the put uploads them again before committing."""
    a, _b = two_checkpoints_one_pruned(url, tmp_path)
    monkeypatch.setenv("REVENANT_FAULT_DELAY", "store.put.before_commit=12")
    done: list = []
    errors: list = []

    def put() -> None:
        try:
            done.append(open_store(url, lock_stale=600).put(KEY, a))
        except Exception as e:
            errors.append(e)

    t = threading.Thread(target=put)
    t.start()
    try:
        gc_store = open_store(url, lock_stale=short_stale(url))
        deadline = time.monotonic() + 9
        # A gc that starts before the put writes its lock stops at its first delete (a writer appeared):
        # go on until one sweeps, which it may once the put's lock looks stale to it. The gc's own lock has
        # the short stale time too, so on a loaded machine a missed heartbeat stops it with LockLost before
        # its next delete (at least one doomed chunk stays): that run is retried like one that swept nothing.
        while True:
            try:
                stats = gc_store.gc(grace_seconds=0)
            except LockLost as e:
                stats = {"lock_lost": str(e), "chunks_deleted": 0}
            if stats["chunks_deleted"] > 0:
                break
            assert time.monotonic() < deadline, stats
            time.sleep(0.2)
        assert t.is_alive(), "the gc must be over before the put re-checks (else the test proves nothing)"
    finally:
        t.join()
    assert not errors, errors
    assert stats["chunks_deleted"] > 0, stats
    store = open_store(url)
    assert store.verify() == []
    store.get(KEY, tmp_path / "r", seq=done[0].seq, fallback=False)
    assert tree_digest(tmp_path / "r") == tree_digest(a)


def test_lapsed_lock_is_stale_to_others_and_aborts_its_put(
    url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    v1 = make_tree(tmp_path / "v1", seed=3, big_mib=1)
    store = open_store(url, lock_stale=2)
    store.put(KEY, v1)
    monkeypatch.setenv("REVENANT_FAULT_FAIL", "store.lock.refresh")
    monkeypatch.setenv("REVENANT_FAULT_DELAY", "store.put.before_commit=3")
    errors: list = []

    def put() -> None:
        try:
            open_store(url, lock_stale=2).put(KEY, make_tree(tmp_path / "v2", seed=4, big_mib=1))
        except Exception as e:
            errors.append(e)

    t = threading.Thread(target=put)
    t.start()
    try:
        watcher = LockWatcher(open_store(url).backend, stale_after=2)
        deadline = time.monotonic() + 30
        while not watcher.live("put-"):
            assert time.monotonic() < deadline, "the put never took its lock"
            time.sleep(0.05)
        seen = time.monotonic()
        while watcher.live("put-"):
            time.sleep(0.1)
        assert time.monotonic() - seen < 2.8, "a lock that is not refreshed is stale after the stale time"
    finally:
        t.join()
    assert len(errors) == 1 and isinstance(errors[0], LockLost), errors
    assert [i.seq for i in store.list(KEY)] == [1], "a put whose lock lapsed committed"
    store.get(KEY, tmp_path / "r")
    assert tree_digest(tmp_path / "r") == tree_digest(v1)


@pytest.mark.parametrize("skew", [-1e9, +1e9])
def test_writer_clock_skew_does_not_change_liveness(url: str, tmp_path: Path, skew: float) -> None:
    make_tree(tmp_path / "t", seed=5, big_mib=1)
    store = open_store(url, lock_stale=3)
    store.put(KEY, tmp_path / "t")
    backend = open_store(url).backend
    stop = threading.Event()

    def skewed_writer() -> None:  # a live put on a node whose clock is far off, refreshing its lock
        beat = 0
        while not stop.is_set():
            beat += 1
            body = {"host": "skewed", "pid": 1, "beat": beat, "time": time.time() + skew}
            backend.put_lock("put-skewedclock", json.dumps(body).encode())
            stop.wait(0.5)

    t = threading.Thread(target=skewed_writer)
    t.start()
    try:
        time.sleep(0.2)
        for _ in range(4):  # over more than the stale time the lock stays live
            assert store.gc(grace_seconds=0).get("skipped", "").startswith("writers active"), "live lock ignored"
            time.sleep(1)
    finally:
        stop.set()
        t.join()
    # The writer dies without removing its lock: stale after the stale time, whatever its clock said.
    deadline = time.monotonic() + 30
    while "skipped" in (stats := store.gc(grace_seconds=0)):
        assert time.monotonic() < deadline, f"a dead writer's lock never went stale: {stats}"
        time.sleep(0.5)
    assert "interrupted" not in stats


def test_repeated_chunks_of_one_put_are_not_reuploaded(url: str, tmp_path: Path) -> None:
    """The pre-commit re-check concerns chunks found already stored, not this put's own repeats (which a
    file store has not indexed yet)."""
    src = tmp_path / "src"
    src.mkdir()
    block = os.urandom(1 << 20)
    (src / "a").write_bytes(block * 8 + os.urandom(1 << 20))
    (src / "b").write_bytes(block * 3)
    store = open_store(url)
    info = store.put(KEY, src)
    distinct = store._load(KEY, info.name).chunk_digests()
    assert info.chunks_new == len(distinct) < info.chunks_total
