"""Checkpoints copied to replica stores (shim.store.replication) on real servers: SeaweedFS (s3://),
Azurite (az://), the CNCF registry (oci://) and file:// stores; the kill tests stop SeaweedFS or
Azurite for real mid-copy and mid-restore."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from harness.store_util import MIB, corrupt_chunk, make_tree, tree_digest
from shim.protect.checkpointer import CRIU_DIR
from shim.protect.policy import Protection
from shim.protect.restorer import RestorePlan, Restorer, RestoreUnavailable
from shim.store import BackendUnavailable, KeyMismatch, StoreError, open_store
from shim.store.replication import Copies, Replicator, replica_status, replicate

KEY = "default/mypod/main"
ROOT = Path(__file__).resolve().parents[2]


def quick(url: str, **kw):
    """A store that gives up on a dead server after two quick attempts (the default retries for ~3 s)."""
    store = open_store(url, **kw)
    store.backend.retries, store.backend.backoff = 2, 0.05
    return store


def checkpoint_tree(root: Path, seed: int, big_mib: int = 4) -> Path:
    """A tree shaped like a protected checkpoint: CRIU images under criu/ (what the Restorer wants)."""
    make_tree(root / CRIU_DIR, seed=seed, big_mib=big_mib)
    return root


def random_tree(root: Path, mib: int) -> Path:
    (root / CRIU_DIR).mkdir(parents=True)
    (root / CRIU_DIR / "pages-1.img").write_bytes(os.urandom(mib * MIB))
    return root


def scratch(tmp_path: Path) -> Path:
    s = tmp_path / "scratch"
    s.mkdir(mode=0o700, exist_ok=True)
    return s


def test_replicate_then_restore_from_the_replica_with_the_primary_gone(s3_server, azure_server, tmp_path: Path) -> None:
    primary, replica = s3_server.url, azure_server.url
    v1, v2 = checkpoint_tree(tmp_path / "v1", 1), checkpoint_tree(tmp_path / "v2", 2)
    with open_store(primary) as p:
        p.put(KEY, v1)
        p.put(KEY, v2)
    with open_store(primary) as p, open_store(replica) as r:
        first = replicate(p, r, KEY)
        assert first.seq == 2 and not first.already and first.chunks_copied > 0 and first.bytes_copied > 0
        assert sorted(r._committed(KEY)) == [2], "a replica gets the newest; intermediate ones may be skipped"
        assert r.verify() == []
        again = replicate(p, r, KEY)
        assert again.already and again.chunks_copied == 0
        # Byte for byte the same stored objects: the manifest under the same name, every chunk.
        name = p._committed(KEY)[2]
        assert r.backend.get_manifest(KEY, name) == p.backend.get_manifest(KEY, name)
    s3_server.stop()
    protection = Protection(
        key=KEY, store=primary, interval_s=0, checkpoint_on_stop=False, keep=3, replicas=(replica,), failover=False
    )
    # Without failover a silent primary is an outage (Create retries), as without replicas.
    with pytest.raises(RestoreUnavailable):
        Restorer(quick).prepare(protection, scratch(tmp_path), None, None)
    # With failover, a replica that answers but holds nothing for the key (it may lag) does not make a
    # fresh start: only the primary can say there is no checkpoint.
    empty = replace(protection, replicas=(f"file://{tmp_path}/empty-replica",), failover=True)
    with pytest.raises(RestoreUnavailable):
        Restorer(quick).prepare(empty, scratch(tmp_path), None, None)
    plan = Restorer(quick).prepare(replace(protection, failover=True), scratch(tmp_path), None, None)
    assert isinstance(plan, RestorePlan) and plan.seq == 2
    assert tree_digest(plan.scratch) == tree_digest(v2)
    plan.discard()


def test_replica_killed_mid_replication_resumes_and_never_shows_half_a_checkpoint(
    s3_server, azure_server, tmp_path: Path
) -> None:
    primary = s3_server.url
    replica = f"{azure_server.url}&pack_mb=1"
    v1, v2 = random_tree(tmp_path / "v1", 12), random_tree(tmp_path / "v2", 12)
    with open_store(primary) as p:
        p.put(KEY, v1)
    stopped, gate = threading.Event(), threading.Event()
    gate.set()
    lock = threading.Lock()
    counts = {"chunks": 0, "opens": 0}

    def opener(url: str):
        store = quick(url)
        if url != replica:
            return store
        with lock:
            counts["opens"] += 1
        gate.wait()
        put = store.backend.put_chunk

        def put_then_kill(digest: str, data: bytes) -> None:
            put(digest, data)
            with lock:
                counts["chunks"] += 1
                kill = counts["chunks"] == 40 and not stopped.is_set()
                if kill:
                    stopped.set()
                    gate.clear()  # hold the next attempt until the test has looked at the replica
            if kill:
                azure_server.stop()

        store.backend.put_chunk = put_then_kill
        return store

    rep = Replicator(opener, backoff_s=0.1, max_backoff_s=0.5)
    rep.submit(primary, [replica], KEY, 1)
    assert stopped.wait(120), "the replica was never killed mid-copy"
    # The primary path does not notice: a new checkpoint commits while the replica is down.
    with open_store(primary) as p:
        info = p.put(KEY, v2)
    assert info.seq == 2
    rep.submit(primary, [replica], KEY, info.seq)
    deadline = time.monotonic() + 60
    while counts["opens"] < 2:  # the failed attempt is over, the retry waits at the gate
        assert time.monotonic() < deadline, "the replicator did not retry"
        time.sleep(0.05)
    assert rep.pending() == 1 and not rep.results
    azure_server.start()
    with open_store(replica) as r:
        assert r.list(KEY) == [] and r._committed(KEY) == {}, "half a checkpoint is visible on the replica"
    gate.set()
    assert rep.wait_idle(120), "replication did not finish once the replica came back"
    assert [(x.key, x.seq) for x in rep.results] == [(KEY, 2)]
    with open_store(replica) as r:
        assert sorted(r._committed(KEY)) == [2] and r.verify() == []
        r.get(KEY, tmp_path / "out")
    assert tree_digest(tmp_path / "out") == tree_digest(v2)
    rep.close()


def _server_of(store, servers: dict):
    return next(srv for prefix, srv in servers.items() if store.url.startswith(prefix))


def test_killed_mid_restore_falls_back_to_the_other_copy(s3_server, azure_server, tmp_path: Path) -> None:
    src = random_tree(tmp_path / "src", 16)
    with open_store(s3_server.url) as p:
        p.put(KEY, src)
        with open_store(azure_server.url) as r:
            replicate(p, r, KEY)
    copies = Copies(quick(s3_server.url), [quick(azure_server.url)])
    nearest = copies.order(KEY)[0]
    servers = {"s3://": s3_server, "az://": azure_server}
    server = _server_of(nearest, servers)
    killed = threading.Event()

    def kill_midway(done: int, total: int) -> None:
        if done > total // 4 and not killed.is_set():
            killed.set()
            server.stop()

    dest = tmp_path / "dest"
    info = copies.get(KEY, dest, progress=kill_midway)
    assert killed.is_set() and info.seq == 1
    assert tree_digest(dest) == tree_digest(src)
    # With every copy gone silent the restore is an outage, never a wrong or partial tree.
    other = _server_of(copies.order(KEY)[1], servers)
    other.stop()
    try:
        with pytest.raises(BackendUnavailable):
            copies.get(KEY, tmp_path / "none")
        assert not (tmp_path / "none").exists()
    finally:
        other.start()
        server.start()


def test_damaged_chunk_on_the_nearest_copy_falls_back(s3_server, tmp_path: Path) -> None:
    primary, replica = f"file://{tmp_path}/primary", s3_server.url
    src = checkpoint_tree(tmp_path / "src", 7)
    with open_store(primary) as p, open_store(replica) as r:
        p.put(KEY, src)
        replicate(p, r, KEY)
    copies = Copies(open_store(primary), [open_store(replica)])
    nearest = copies.order(KEY)[0]
    digest = sorted(nearest._load(KEY, nearest._committed(KEY)[1]).chunk_digests())[0]
    corrupt_chunk(nearest, s3_server if nearest.url == replica else None, digest)
    copies.get(KEY, tmp_path / "dest")
    assert tree_digest(tmp_path / "dest") == tree_digest(src)
    # verify over every copy names the damaged one, and only it.
    out = _cli("verify", "--store", primary, "--replica", replica, "--json")
    assert out.returncode == 1
    problems = json.loads(out.stdout)["problems"]
    assert problems and all(p.startswith(f"{nearest.url}: ") and digest in p for p in problems), problems
    # Replication never copies damage: from the damaged copy to a fresh store it fails, nothing committed.
    fresh = f"file://{tmp_path}/fresh"
    with open_store(fresh) as f:
        with pytest.raises(StoreError, match=digest):
            replicate(nearest, f, KEY)
        assert f._committed(KEY) == {}


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(Path(sys.executable).parent / "revenant"), "store", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
    )


def test_status_shows_lag_and_replicate_catches_up(s3_server, tmp_path: Path, caplog) -> None:
    primary, replica = s3_server.url, f"file://{tmp_path}/replica"
    with open_store(primary) as p:
        p.put(KEY, checkpoint_tree(tmp_path / "v1", 1))
        with open_store(replica) as r:
            replicate(p, r, KEY)
        time.sleep(1.0)
        second = p.put(KEY, checkpoint_tree(tmp_path / "v2", 2))
        time.sleep(1.0)
        with open_store(replica) as r:
            (status,) = replica_status(p, [r], KEY)
    assert (status.primary_seq, status.replica_seq, status.behind) == (2, 1, 1)
    assert status.lag_s >= 1.0 and abs(status.lag_s - (time.time() - second.created)) < 5
    out = _cli("replicas", "--store", primary, "--replica", replica, "--json", "--strict")
    assert out.returncode == 2, out.stderr
    (row,) = json.loads(out.stdout)
    assert (row["primary_seq"], row["replica_seq"], row["behind"]) == (2, 1, 1) and row["lag_s"] >= 1.0
    out = _cli("replicate", "--store", primary, "--replica", replica, "--progress-interval", "0.1")
    assert out.returncode == 0, out.stderr
    assert f"replicate {KEY} seq 2 to {replica}" in out.stdout
    out = _cli("replicas", "--store", primary, "--replica", replica, "--json", "--strict")
    assert out.returncode == 0, out.stdout + out.stderr
    (row,) = json.loads(out.stdout)
    assert (row["replica_seq"], row["behind"], row["lag_s"]) == (2, 0, 0.0)
    # The log says when replication of seq N to R finished.
    with caplog.at_level("INFO", logger="shim.store.replication"), open_store(primary) as p:
        p.put(KEY, checkpoint_tree(tmp_path / "v3", 3))
        with open_store(replica) as r:
            replicate(p, r, KEY)
    assert any(f"replication of {KEY!r} seq 3 to {replica} finished" in m for m in caplog.messages)
    # Retention follows the primary: what it pruned goes from the replica at the next copy.
    with open_store(primary) as p, open_store(replica) as r:
        p.prune(KEY, 1)
        p.put(KEY, checkpoint_tree(tmp_path / "v4", 4))
        result = replicate(p, r, KEY)
        assert result.deleted == [1, 2] and sorted(r._committed(KEY)) == [3, 4]


def test_crash_mid_replication_leaves_nothing_then_completes(s3_server, tmp_path: Path) -> None:
    primary, replica = f"file://{tmp_path}/primary", s3_server.url
    src = random_tree(tmp_path / "src", 4)
    with open_store(primary) as p:
        p.put(KEY, src)
    out = _cli(
        "replicate",
        "--store",
        primary,
        "--replica",
        replica,
        env={"REVENANT_SNAPSHOTTER_CRASH_AT": "store.replicate.after-chunk"},
    )
    assert out.returncode == -9, out.stderr
    with open_store(replica) as r:
        assert r._committed(KEY) == {}
    out = _cli("replicate", "--store", primary, "--replica", replica, "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["copies"][0]["seq"] == 1
    with open_store(replica) as r:
        assert r.verify() == []
        r.get(KEY, tmp_path / "out")
    assert tree_digest(tmp_path / "out") == tree_digest(src)


def test_replicas_hold_the_same_sealed_objects_and_need_the_same_key(s3_server, tmp_path: Path) -> None:
    k1, k2 = tmp_path / "k1", tmp_path / "k2"
    for k in (k1, k2):
        fd = os.open(k, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, os.urandom(32))
        os.close(fd)
    primary = f"file://{tmp_path}/primary"
    src = checkpoint_tree(tmp_path / "src", 9)
    with open_store(primary, key_files=[k1]) as p:
        p.put(KEY, src)
        for other in ([k2], None):
            with open_store(s3_server.url, key_files=other) as r:
                with pytest.raises(KeyMismatch):
                    replicate(p, r, KEY)
                assert r._committed(KEY) == {} and list(r.backend.list_chunks() or []) == []
        with open_store(s3_server.url, key_files=[k2, k1]) as r:  # k1 among its keys: it can read the copy
            replicate(p, r, KEY)
            assert r.verify() == []
            r.get(KEY, tmp_path / "out")
    assert tree_digest(tmp_path / "out") == tree_digest(src)


def test_shim_exit_waits_a_bounded_time_for_queued_copies(s3_server, tmp_path: Path) -> None:
    from shim.store.replication import drain_all, shared_replicator

    primary, replica = f"file://{tmp_path}/primary", s3_server.url
    with open_store(primary) as p:
        seq = p.put(KEY, checkpoint_tree(tmp_path / "v1", 1)).seq

    def opener(url: str):  # its own opener: a Replicator of its own among the shared ones
        return quick(url)

    rep = shared_replicator(opener)
    assert shared_replicator(opener) is rep, "one Replicator per process and opener"
    s3_server.stop()
    rep.submit(primary, [replica], KEY, seq)
    t = time.monotonic()
    assert drain_all(1.0) is False, "a replica that is down cannot be waited for"
    assert time.monotonic() - t < 10
    s3_server.start()
    assert drain_all(120) is True
    with open_store(replica) as r:
        assert sorted(r._committed(KEY)) == [seq]
    rep.close()


def test_cli_takes_primary_and_replicas_from_the_node_config(tmp_path: Path) -> None:
    primary, replica = f"file://{tmp_path}/primary", f"file://{tmp_path}/replica"
    config = tmp_path / "config.toml"
    config.write_text(f'default_store = "main"\n[stores.main]\nurl = "{primary}"\nreplicas = ["{replica}"]\n')
    env = {"REVENANT_CONFIG": str(config)}
    with open_store(primary) as p:
        p.put(KEY, checkpoint_tree(tmp_path / "v1", 1))
    out = _cli("replicas", "--node-store", "main", "--json", "--strict", env=env)
    assert out.returncode == 2, out.stderr
    assert [(r["replica"], r["replica_seq"], r["behind"]) for r in json.loads(out.stdout)] == [(replica, None, 1)]
    out = _cli("replicate", "--node-store", "main", "--json", env=env)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["status"][0]["replica_seq"] == 1
    out = _cli("verify", "--node-store", "main", "--json", env=env)
    assert out.returncode == 0 and json.loads(out.stdout) == {"ok": True, "problems": []}, out.stdout + out.stderr
    out = _cli("replicas", "--node-store", "nope", env=env)
    assert out.returncode == 1 and "no store named 'nope'" in out.stderr


def test_page_granular_checkpoints_replicate_whole(s3_server, tmp_path: Path) -> None:
    """A v2 manifest references slices of chunks and a page table: the copy carries every one of them."""
    page, pages = 4096, 2048
    first = bytearray(os.urandom(page * pages))
    a, b = tmp_path / "a", tmp_path / "b"
    for root, data in ((a, first), (b, first)):
        (root / CRIU_DIR).mkdir(parents=True)
        (root / CRIU_DIR / "pages-1.img").write_bytes(data)
    second = bytearray(first)
    for i in range(0, pages, 97):  # scattered single pages rewritten: slices of the parent's chunks
        second[i * page : (i + 1) * page] = os.urandom(page)
    (b / CRIU_DIR / "pages-1.img").write_bytes(second)
    primary, replica = f"file://{tmp_path}/primary", s3_server.url
    with open_store(primary) as p:
        p.put(KEY, a, page_images=(f"{CRIU_DIR}/pages-*.img",))
        p.put(KEY, b, page_images=(f"{CRIU_DIR}/pages-*.img",))
        m = p._load(KEY, p._committed(KEY)[2])
        assert m.page_table is not None
        assert any(len(ref) == 5 for e in m.entries if e["type"] == "file" for ref in e["chunks"]), "no slices"
        with open_store(replica) as r:
            result = replicate(p, r, KEY)
            assert result.seq == 2
            assert r.verify() == []
            r.get(KEY, tmp_path / "out")
    assert tree_digest(tmp_path / "out") == tree_digest(b)
