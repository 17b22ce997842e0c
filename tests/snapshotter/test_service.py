"""The gRPC service straight on its socket (no containerd): codes, namespaces, filters, masks, lifecycle."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import field_mask_pb2

from harness.snapshotter_proc import SnapshotterProcess
from revenant_pb.containerd.services.snapshots.v1 import snapshots_pb2 as pb

NS = (("containerd-namespace", "ns1"),)
NS2 = (("containerd-namespace", "ns2"),)


@pytest.fixture
def snap(tmp_path: Path) -> Iterator[SnapshotterProcess]:
    p = SnapshotterProcess(str(tmp_path / "s.sock"), tmp_path / "root")
    p.start()
    try:
        yield p
    finally:
        p.kill()


def code_of(fn, *args, **kw) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as e:
        fn(*args, **kw)
    return e.value.code()


def names(stub, filters: list[str], md=NS) -> list[str]:
    return sorted(i.name for r in stub.List(pb.ListSnapshotsRequest(filters=filters), metadata=md) for i in r.info)


def test_socket_is_private(snap: SnapshotterProcess) -> None:
    assert stat.S_IMODE(os.stat(snap.address).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(snap.root).st_mode) == 0o700


def test_codes_semantics_and_namespaces(snap: SnapshotterProcess) -> None:
    with snap.client() as c:
        m = c.Prepare(pb.PrepareSnapshotRequest(key="a"), metadata=NS).mounts
        assert [(x.type, list(x.options)) for x in m] == [("bind", ["rw", "rbind"])]
        assert code_of(c.Prepare, pb.PrepareSnapshotRequest(key="a"), metadata=NS) == grpc.StatusCode.ALREADY_EXISTS
        # The same key in another namespace is another snapshot.
        c.Prepare(pb.PrepareSnapshotRequest(key="a"), metadata=NS2)
        assert code_of(c.Prepare, pb.PrepareSnapshotRequest(key="b", parent="nope"), metadata=NS) == (
            grpc.StatusCode.NOT_FOUND
        )
        assert code_of(c.Prepare, pb.PrepareSnapshotRequest(key="b", parent="a"), metadata=NS) == (
            grpc.StatusCode.INVALID_ARGUMENT
        )
        c.Commit(pb.CommitSnapshotRequest(name="base", key="a", labels={"l": "1"}), metadata=NS)
        assert code_of(c.Stat, pb.StatSnapshotRequest(key="a"), metadata=NS) == grpc.StatusCode.NOT_FOUND
        info = c.Stat(pb.StatSnapshotRequest(key="base"), metadata=NS).info
        assert (info.name, info.kind, dict(info.labels)) == ("base", pb.COMMITTED, {"l": "1"})
        assert code_of(c.Mounts, pb.MountsRequest(key="base"), metadata=NS) == grpc.StatusCode.FAILED_PRECONDITION
        c.Prepare(pb.PrepareSnapshotRequest(key="act", parent="base", labels={"team": "red"}), metadata=NS)
        c.View(pb.ViewSnapshotRequest(key="v", parent="base"), metadata=NS)
        assert code_of(c.Commit, pb.CommitSnapshotRequest(name="x", key="v"), metadata=NS) == (
            grpc.StatusCode.FAILED_PRECONDITION
        )
        assert code_of(c.Commit, pb.CommitSnapshotRequest(name="base", key="act"), metadata=NS) == (
            grpc.StatusCode.ALREADY_EXISTS
        )
        assert code_of(c.Remove, pb.RemoveSnapshotRequest(key="base"), metadata=NS) == (
            grpc.StatusCode.FAILED_PRECONDITION
        )
        assert code_of(c.Remove, pb.RemoveSnapshotRequest(key="zzz"), metadata=NS) == grpc.StatusCode.NOT_FOUND
        vm = c.Mounts(pb.MountsRequest(key="v"), metadata=NS).mounts
        assert [(x.type, list(x.options)) for x in vm] == [("bind", ["ro", "rbind"])]
        am = c.Mounts(pb.MountsRequest(key="act"), metadata=NS).mounts
        assert am[0].type == "overlay" and any(o.startswith("upperdir=") for o in am[0].options)
        u = c.Usage(pb.UsageRequest(key="act"), metadata=NS)
        assert u.inodes == 1
        assert names(c, [], NS2) == ["a"]
        assert names(c, []) == ["act", "base", "v"]


def test_list_filters(snap: SnapshotterProcess) -> None:
    with snap.client() as c:
        c.Prepare(pb.PrepareSnapshotRequest(key="a"), metadata=NS)
        c.Commit(pb.CommitSnapshotRequest(name="base", key="a"), metadata=NS)
        c.Prepare(pb.PrepareSnapshotRequest(key="act", parent="base", labels={"team": "red", "x.y": "z"}), metadata=NS)
        c.View(pb.ViewSnapshotRequest(key="v", parent="base", labels={"team": "blue"}), metadata=NS)
        assert names(c, ["kind==active"]) == ["act"]
        assert names(c, ["kind==committed"]) == ["base"]
        assert names(c, ["kind==Active"]) == []  # containerd spells kinds in lower case
        assert names(c, ["parent==base"]) == ["act", "v"]
        assert names(c, ["name==v"]) == ["v"]
        assert names(c, ['labels."team"==red']) == ["act"]
        assert names(c, ["labels.team==blue"]) == ["v"]
        assert names(c, ['labels."x.y"==z']) == ["act"]
        assert names(c, ["labels.team"]) == ["act", "v"]
        assert names(c, ["labels.team!=red"]) == ["base", "v"]
        assert names(c, ["name~=^a"]) == ["act"]
        assert names(c, ["parent==base,kind==view"]) == ["v"]
        assert names(c, ["kind==view", "kind==committed"]) == ["base", "v"]
        assert names(c, ["parent!=base,kind==committed"]) == ["base"]  # parent "" is present, != base
        assert names(c, ['name=="act"']) == ["act"]
        assert code_of(names, c, ["name=="]) == grpc.StatusCode.INVALID_ARGUMENT
        assert code_of(names, c, ["name~=("]) == grpc.StatusCode.INVALID_ARGUMENT


def test_update_field_masks(snap: SnapshotterProcess) -> None:
    with snap.client() as c:
        c.Prepare(pb.PrepareSnapshotRequest(key="a", labels={"keep": "1", "drop": "2"}), metadata=NS)
        req = pb.UpdateSnapshotRequest(
            info=pb.Info(name="a", labels={"new": "3"}), update_mask=field_mask_pb2.FieldMask(paths=["labels.new"])
        )
        assert dict(c.Update(req, metadata=NS).info.labels) == {"keep": "1", "drop": "2", "new": "3"}
        req = pb.UpdateSnapshotRequest(
            info=pb.Info(name="a"), update_mask=field_mask_pb2.FieldMask(paths=["labels.drop"])
        )
        assert dict(c.Update(req, metadata=NS).info.labels) == {"keep": "1", "new": "3"}
        req = pb.UpdateSnapshotRequest(info=pb.Info(name="a", labels={"only": "x"}))
        assert dict(c.Update(req, metadata=NS).info.labels) == {"only": "x"}
        req = pb.UpdateSnapshotRequest(info=pb.Info(name="a"), update_mask=field_mask_pb2.FieldMask(paths=["parent"]))
        assert code_of(c.Update, req, metadata=NS) == grpc.StatusCode.INVALID_ARGUMENT
        req = pb.UpdateSnapshotRequest(info=pb.Info(name="nope"))
        assert code_of(c.Update, req, metadata=NS) == grpc.StatusCode.NOT_FOUND
        st = c.Stat(pb.StatSnapshotRequest(key="a"), metadata=NS).info
        assert st.updated_at.ToNanoseconds() >= st.created_at.ToNanoseconds()


def test_restart_keeps_state_and_sigterm_is_clean(snap: SnapshotterProcess) -> None:
    with snap.client() as c:
        c.Prepare(pb.PrepareSnapshotRequest(key="a"), metadata=NS)
        c.Commit(pb.CommitSnapshotRequest(name="base", key="a"), metadata=NS)
        c.Prepare(pb.PrepareSnapshotRequest(key="b", parent="base"), metadata=NS)
    assert snap.stop() == 0, snap.log_tail()
    assert not os.path.exists(snap.address), "SIGTERM leaves no stale socket"
    snap.start()
    with snap.client() as c:
        assert names(c, []) == ["b", "base"]


def test_cleanup_removes_leftovers(snap: SnapshotterProcess) -> None:
    sdir = snap.root / "snapshots"
    with snap.client() as c:
        c.Prepare(pb.PrepareSnapshotRequest(key="a"), metadata=NS)
        (sdir / "999" / "fs").mkdir(parents=True)  # a directory no row owns
        (sdir / "rm-998").mkdir()
        c.Cleanup(pb.CleanupRequest(), metadata=NS)
        left = sorted(os.listdir(sdir))
        assert left == ["1"], left
        assert names(c, []) == ["a"]


def test_cleanup_concurrent_with_prepares_never_removes_a_live_snapshot(snap: SnapshotterProcess) -> None:
    import threading

    stop = threading.Event()

    def cleaner() -> None:
        with snap.client() as c:
            while not stop.is_set():
                c.Cleanup(pb.CleanupRequest(), metadata=NS)

    t = threading.Thread(target=cleaner)
    t.start()
    try:
        with snap.client() as c:
            for i in range(60):
                c.Prepare(pb.PrepareSnapshotRequest(key=f"k{i}"), metadata=NS)
                if i % 3 == 0:
                    c.Remove(pb.RemoveSnapshotRequest(key=f"k{i}"), metadata=NS)
    finally:
        stop.set()
        t.join()
    sdir = snap.root / "snapshots"
    with snap.client() as c:
        c.Cleanup(pb.CleanupRequest(), metadata=NS)
        live = names(c, [])
        for key in live:
            m = c.Mounts(pb.MountsRequest(key=key), metadata=NS).mounts[0]
            assert Path(m.source).is_dir(), f"{key}: its directory was removed by a concurrent Cleanup"
    assert len(live) == 40 and len(os.listdir(sdir)) == 40
