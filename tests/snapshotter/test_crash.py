"""SIGKILL at every step of Prepare, Commit and Remove: the restarted snapshotter is consistent.

Consistent means: every snapshot row has its directory; after Cleanup every directory has its row;
an interrupted operation either happened completely or not at all; committed data is intact; the
operation can be retried; containerd keeps working with the restarted snapshotter.
"""

from __future__ import annotations

import os
import random
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from harness.snapshotter_proc import RevenantNode, SnapshotterProcess, wait_containerd_reaches
from revenant_pb.containerd.services.snapshots.v1 import snapshots_pb2 as pb

NS = (("containerd-namespace", "crash"),)


@pytest.fixture
def snap(tmp_path: Path) -> Iterator[SnapshotterProcess]:
    p = SnapshotterProcess(str(tmp_path / "s.sock"), tmp_path / "root")
    p.start()
    try:
        yield p
    finally:
        p.kill()


def rows(root: Path) -> dict[str, tuple[int, int]]:
    """key -> (id, kind), read straight from the database."""
    db = sqlite3.connect(f"file:{root / 'metadata.db'}?mode=ro", uri=True)
    try:
        return {k: (i, kind) for i, k, kind in db.execute("SELECT id, key, kind FROM snapshots")}
    finally:
        db.close()


def assert_consistent(snap: SnapshotterProcess) -> dict[str, tuple[int, int]]:
    sdir = snap.root / "snapshots"
    r = rows(snap.root)
    for key, (sid, kind) in r.items():
        assert (sdir / str(sid) / "fs").is_dir(), f"{key}: row without its directory"
        if kind == pb.ACTIVE:
            assert (sdir / str(sid) / "work").is_dir(), f"{key}: active without workdir"
    with snap.client() as c:
        c.Cleanup(pb.CleanupRequest(), metadata=NS)
        listed = sorted(i.name for resp in c.List(pb.ListSnapshotsRequest(), metadata=NS) for i in resp.info)
    assert listed == sorted(r)
    assert sorted(os.listdir(sdir)) == sorted(str(sid) for sid, _ in r.values()), "leftover after Cleanup"
    return r


def setup_base(snap: SnapshotterProcess) -> None:
    with snap.client() as c:
        c.Prepare(pb.PrepareSnapshotRequest(key="base-a"), metadata=NS)
        sid = rows(snap.root)["base-a"][0]
        (snap.root / "snapshots" / str(sid) / "fs" / "precious.txt").write_text("committed data\n")
        c.Commit(pb.CommitSnapshotRequest(name="base", key="base-a"), metadata=NS)
        c.Prepare(pb.PrepareSnapshotRequest(key="act", parent="base"), metadata=NS)


def crash(snap: SnapshotterProcess, point: str, call) -> None:
    snap.restart(env={"REVENANT_SNAPSHOTTER_CRASH_AT": point})
    with snap.client() as c, pytest.raises(grpc.RpcError) as e:
        call(c)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE, e.value
    assert snap.wait_dead() == -9, "the snapshotter must have died at the crash point"
    snap.start()


def precious_intact(snap: SnapshotterProcess) -> None:
    sid = rows(snap.root)["base"][0]
    assert (snap.root / "snapshots" / str(sid) / "fs" / "precious.txt").read_text() == "committed data\n"


@pytest.mark.parametrize("point", ["prepare-before-commit", "prepare-after-rename", "prepare-after-commit"])
def test_sigkill_during_prepare(snap: SnapshotterProcess, point: str) -> None:
    setup_base(snap)
    crash(snap, point, lambda c: c.Prepare(pb.PrepareSnapshotRequest(key="new", parent="base"), metadata=NS))
    r = assert_consistent(snap)
    precious_intact(snap)
    assert ("new" in r) == (point == "prepare-after-commit")
    with snap.client() as c:
        if "new" in r:
            c.Remove(pb.RemoveSnapshotRequest(key="new"), metadata=NS)
        c.Prepare(pb.PrepareSnapshotRequest(key="new", parent="base"), metadata=NS)  # the retry works
    assert_consistent(snap)


@pytest.mark.parametrize("point", ["commit-before-commit", "commit-after-commit"])
def test_sigkill_during_commit(snap: SnapshotterProcess, point: str) -> None:
    setup_base(snap)
    sid = rows(snap.root)["act"][0]
    (snap.root / "snapshots" / str(sid) / "fs" / "work.txt").write_text("container output\n")
    crash(snap, point, lambda c: c.Commit(pb.CommitSnapshotRequest(name="done", key="act"), metadata=NS))
    r = assert_consistent(snap)
    precious_intact(snap)
    committed = point == "commit-after-commit"
    assert ("done" in r, "act" in r) == (committed, not committed), r
    key = "done" if committed else "act"
    assert (snap.root / "snapshots" / str(r[key][0]) / "fs" / "work.txt").read_text() == "container output\n"
    if not committed:
        with snap.client() as c:
            c.Commit(pb.CommitSnapshotRequest(name="done", key="act"), metadata=NS)
        assert "done" in assert_consistent(snap)


@pytest.mark.parametrize("point", ["remove-after-commit", "remove-after-rename"])
def test_sigkill_during_remove(snap: SnapshotterProcess, point: str) -> None:
    setup_base(snap)
    crash(snap, point, lambda c: c.Remove(pb.RemoveSnapshotRequest(key="act"), metadata=NS))
    r = assert_consistent(snap)  # Cleanup deletes the half-removed directory
    assert "act" not in r
    precious_intact(snap)


def test_sigkill_at_random_moments_under_load(snap: SnapshotterProcess) -> None:
    """A client keeps preparing, committing and removing; the snapshotter is SIGKILLed at random."""
    setup_base(snap)
    rng = random.Random(7)
    for round_ in range(8):
        stop = threading.Event()

        def churn(round_: int = round_, stop: threading.Event = stop) -> None:
            i = 0
            with snap.client() as c:
                while not stop.is_set():
                    i += 1
                    k = f"r{round_}-{i}"
                    try:
                        c.Prepare(pb.PrepareSnapshotRequest(key=k, parent="base"), metadata=NS, timeout=5)
                        c.Commit(pb.CommitSnapshotRequest(name=k + "-c", key=k), metadata=NS, timeout=5)
                        if i % 2:
                            c.Remove(pb.RemoveSnapshotRequest(key=k + "-c"), metadata=NS, timeout=5)
                    except grpc.RpcError:
                        return

        t = threading.Thread(target=churn)
        t.start()
        time.sleep(rng.uniform(0.05, 0.4))
        snap.kill()
        stop.set()
        t.join(30)
        snap.start()
        assert_consistent(snap)
        precious_intact(snap)


def top_layer(node) -> str:
    rows = [r.split() for r in node.ctr("snapshots", "--snapshotter", "revenant", "ls").stdout.splitlines()[1:]]
    return next(r[0] for r in rows if r[-1] == "Committed")


def test_containerd_survives_snapshotter_sigkill(revenant_node: RevenantNode, test_images) -> None:
    node, snap = revenant_node.node, revenant_node.snapshotter
    node.ctr("images", "import", "--snapshotter", "revenant", str(test_images.busybox), timeout=300)
    layer = top_layer(node)
    runc = ("--runc-root", str(node.runc_root))
    node.ctr(
        "run",
        "-d",
        "--snapshotter",
        "revenant",
        *runc,
        test_images.busybox_ref,
        "long",
        "sh",
        "-c",
        "echo before > /kept; sleep 600",
    )
    snap.kill()
    snap.start()
    wait_containerd_reaches(node, layer)
    # The running container never noticed: its rootfs is a kernel mount, its writes are kept.
    assert node.ctr("tasks", "exec", "--exec-id", "probe", "long", "cat", "/kept").stdout == "before\n"
    node.ctr("tasks", "kill", "-s", "SIGKILL", "long")
    node.ctr("tasks", "rm", "-f", "long")
    node.ctr("containers", "rm", "long")  # removes its snapshot through the restarted snapshotter
    assert "long" not in node.ctr("snapshots", "--snapshotter", "revenant", "ls").stdout
    out = node.ctr(
        "run",
        "--rm",
        "--snapshotter",
        "revenant",
        "--runc-root",
        str(node.runc_root),
        test_images.busybox_ref,
        "after-kill",
        "sh",
        "-c",
        "echo still-works",
    ).stdout
    assert "still-works" in out
    node.restart()
    out = node.ctr(
        "run",
        "--rm",
        "--snapshotter",
        "revenant",
        "--runc-root",
        str(node.runc_root),
        test_images.busybox_ref,
        "after-restart",
        "sh",
        "-c",
        "echo again",
    ).stdout
    assert "again" in out
