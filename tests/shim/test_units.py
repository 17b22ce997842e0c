"""Unit tests of the shim's pure parts: wire encodings, state machine, option handling, stats mapping."""

from __future__ import annotations

import hashlib
import time

import pytest

from revenant_pb.containerd.runc.v1 import oci_pb2
from revenant_pb.containerd.task.v2 import shim_pb2
from shim.daemon import grouping, main
from shim.errors import FailedPrecondition, NotFound
from shim.runc.reaper import exit_status_of
from shim.task import runtime_options
from shim.task.mounts import MS_BIND, MS_NODEV, MS_NOSUID, MS_RDONLY, MS_REC, parse_options
from shim.task.process import Process, State
from shim.task.stats import metrics_from_runc


@pytest.mark.parametrize(
    ("pid", "status", "ns"), [(0, 137, time.time_ns()), (1234, 0, 5), (1, 1, 0), (0, 0, 10**9), (2**31, 255, 2**62)]
)
def test_delete_response_encoding_matches_protobuf(pid, status, ns):
    ref = shim_pb2.DeleteResponse(pid=pid, exit_status=status)
    ref.exited_at.FromNanoseconds(ns)
    assert main.encode_delete_response(pid, status, ns) == ref.SerializeToString()


def test_socket_path_is_containerd_hash():
    want = hashlib.sha256(b"/run/c.sock/ns1/ctr").hexdigest()
    assert grouping.socket_path("/run/c.sock", "ns1", "ctr") == f"/run/containerd/s/{want}"
    assert grouping.socket_path("/run//c.sock/", "ns1", "ctr") == f"/run/containerd/s/{want}"  # cleaned like Go


def test_parse_go_style_flags():
    a = main.parse_args(
        ["-namespace", "k8s.io", "-address", "/a.sock", "-publish-binary", "/bin/c", "-id", "x", "-debug", "start"]
    )
    assert (a.namespace, a.address, a.publish_binary, a.id, a.debug, a.action) == (
        "k8s.io",
        "/a.sock",
        "/bin/c",
        "x",
        True,
        "start",
    )
    assert main.parse_args(["--id=y", "-bundle", "/b", "delete"]).id == "y"
    assert main.parse_args(["-v"]).version
    with pytest.raises(SystemExit):
        main.parse_args(["-bogus"])


def test_group_annotation_selects_the_sandbox(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("REVENANT_SHIM_SHARED", raising=False)
    assert grouping.group_of("c1") == "c1"  # default: a shim per container
    monkeypatch.setenv("REVENANT_SHIM_SHARED", "1")
    assert grouping.group_of("c1") == grouping.SHARED_GROUP  # no sandbox: the namespace's shared shim
    (tmp_path / "config.json").write_text('{"annotations": {"io.kubernetes.cri.sandbox-id": "pod1"}}')
    assert grouping.group_of("c1") == "pod1"
    monkeypatch.delenv("REVENANT_SHIM_SHARED")
    assert grouping.group_of("c1") == "pod1"


def test_ttrpc_status_parsing():
    from revenant_pb.google.rpc import status_pb2
    from revenant_pb.ttrpc import ttrpc_pb2

    ok = ttrpc_pb2.Response(payload=b"x").SerializeToString()
    assert main._status_code(ok) == 0
    failed = ttrpc_pb2.Response(status=status_pb2.Status(code=9, message="exiting")).SerializeToString()
    assert main._status_code(failed) == 9
    from revenant_pb.revenant.shim.v1 import shim_pb2 as shim_api

    reserved = ttrpc_pb2.Response(payload=shim_api.ReserveResponse(pid=4242).SerializeToString())
    assert main._status_code(reserved.SerializeToString()) == 0
    assert main._reserve_pid(reserved.SerializeToString()) == 4242


def test_state_machine_rejects_illegal_calls():
    p = Process(container_id="c", exec_id="", bundle="/b")
    with pytest.raises(FailedPrecondition):
        p.advance("pause")  # created
    p.advance("start")
    assert p.state is State.RUNNING
    with pytest.raises(FailedPrecondition):
        p.advance("delete")  # running
    p.advance("pause")
    with pytest.raises(FailedPrecondition):
        p.advance("start")
    p.advance("resume")
    assert p.set_exited(137) and not p.set_exited(1)  # first exit wins
    assert p.state is State.STOPPED and p.wait(0).status == 137
    with pytest.raises(NotFound):
        p.check("kill")
    p.advance("delete")
    assert p.state is State.DELETED


def test_exit_status_convention():
    assert exit_status_of(0) == 0
    assert exit_status_of(3 << 8) == 3
    assert exit_status_of(9) == 137  # killed by SIGKILL


def test_runc_root_default_and_from_options(tmp_path):
    bundle = tmp_path / "state" / "io.containerd.runtime.v2.task" / "ns" / "ctr"
    bundle.mkdir(parents=True)
    opts = runtime_options.from_request(None, str(bundle), "ns")
    assert opts.root == str(tmp_path / "state" / "revenant" / "runc" / "ns")
    any_msg = shim_pb2.CreateTaskRequest().options
    any_msg.type_url = "containerd.runc.v1.Options"
    any_msg.value = oci_pb2.Options(root="/custom", binary_name="crun", systemd_cgroup=True).SerializeToString()
    opts = runtime_options.from_request(any_msg, str(bundle), "ns")
    assert (opts.root, opts.binary, opts.systemd_cgroup) == ("/custom/ns", "crun", True)
    opts.save(str(bundle))
    loaded = runtime_options.RuntimeOptions.load(str(bundle))
    assert loaded is not None and loaded.root == "/custom/ns" and loaded.binary == "crun"
    any_msg.type_url = "other.Type"
    with pytest.raises(ValueError):
        runtime_options.from_request(any_msg, str(bundle), "ns")


def test_mount_options():
    flags, propagation, data = parse_options(["rbind", "ro", "nosuid", "nodev", "rprivate", "lowerdir=/a"])
    assert flags == MS_BIND | MS_REC | MS_RDONLY | MS_NOSUID | MS_NODEV
    assert propagation and data == "lowerdir=/a"
    assert parse_options(["ro", "rw"])[0] & MS_RDONLY == 0


def test_runc_stats_to_cgroup_v1_metrics():
    data = {
        "cpu": {"usage": {"total": 100, "percpu": [60, 40], "kernel": 10, "user": 90}, "throttling": {"periods": 2}},
        "memory": {
            "cache": 7,
            "usage": {"usage": 4096, "limit": 8192, "max": 5000, "failcnt": 1},
            "raw": {"rss": 11, "pgfault": 12, "total_pgmajfault": 13},
        },
        "pids": {"current": 3, "limit": 100},
        "blkio": {"ioServiceBytesRecursive": [{"major": 8, "minor": 0, "op": "Read", "value": 512}]},
        "hugetlb": {"2MB": {"usage": 1, "max": 2, "failcnt": 0}},
    }
    m = metrics_from_runc(data)
    assert m.DESCRIPTOR.full_name == "io.containerd.cgroups.v1.Metrics"
    assert (m.cpu.usage.total, list(m.cpu.usage.per_cpu), m.cpu.throttling.periods) == (100, [60, 40], 2)
    assert (m.memory.usage.usage, m.memory.usage.limit, m.memory.cache, m.memory.rss) == (4096, 8192, 7, 11)
    assert (m.memory.pg_fault, m.memory.total_pg_maj_fault) == (12, 13)
    assert (m.pids.current, m.pids.limit) == (3, 100)
    assert m.blkio.io_service_bytes_recursive[0].value == 512
    assert m.hugetlb[0].pagesize == "2MB"


def test_start_replaces_a_dead_shims_socket(tmp_path, monkeypatch):
    import socket

    monkeypatch.setattr(main, "SOCKET_DIR", str(tmp_path))
    path = str(tmp_path / "s")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()  # the file stays, nobody listens: a shim that was SIGKILLed
    listener, _ = main._listen(path, "c1")
    try:
        assert listener is not None
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.connect(path)  # the new listener owns the path
        client.close()
    finally:
        listener.close()
