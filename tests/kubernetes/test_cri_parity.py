"""Pods through CRI with `runtime_handler: revenant` behave as with the stock `runc` handler: the same
statuses, exit codes and reasons (OOMKilled included), CRI-format logs, exec, stats, log reopening and
the kubelet's re-creation of an exited container with the next attempt number. Each scenario runs under
both handlers on the same node and the observations are compared, besides being checked outright.
Real parts: containerd 1.6 and 1.7 with CRI, CNI bridge networking, runc, the revenant shim.
"""

from __future__ import annotations

import os
import re
import time
import uuid
from pathlib import Path

import grpc
import pytest

from harness.cri import EXITED, RUNNING, ContainerSpec, PodSpec, read_cri_log
from harness.images import BUSYBOX_REF, MEMJOB_REF
from harness.wait import wait_until

pytestmark = pytest.mark.timeout(300)

HANDLERS = ("runc", "revenant")
TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)$")


def new_pod(node, name: str, **kw) -> PodSpec:
    return PodSpec(name=name, log_directory=str(node.logs / name), **kw)


def log_lines(path: Path) -> list[tuple[str, str, str]]:
    """(stream, tag, content) per line; every timestamp must be RFC 3339 with nanoseconds."""
    lines = read_cri_log(path)
    for ts, *_ in lines:
        assert TIMESTAMP.match(ts), f"bad CRI log timestamp {ts!r} in {path}"
    return [(stream, tag, content) for _ts, stream, tag, content in lines]


def exited_scenario(node, handler: str) -> dict:
    """A container that writes to both streams and exits 3; the kubelet re-creates it (attempt 1)."""
    pod = new_pod(node, f"exit-{handler}")
    spec = ContainerSpec("main", BUSYBOX_REF, command=["sh", "-c", "echo out-$ATTEMPT; echo err-$ATTEMPT >&2; exit 3"])
    spec.envs = {"ATTEMPT": "0"}
    cri = node.cri
    pod_id, [cid] = cri.start_pod(pod, handler, [spec])
    try:
        st = cri.wait_state(cid, EXITED)
        first_log = sorted(log_lines(Path(st.log_path)))
        spec.envs = {"ATTEMPT": "1"}
        cid, _next = cri.restart(pod_id, pod, spec, cid)
        st1 = cri.wait_state(cid, EXITED)
        return {
            "exit_code": st.exit_code,
            "reason": st.reason,
            "timestamps_set": st.created_at > 0 and st.started_at > 0 and st.finished_at > 0,
            "log": first_log,
            "log_name": Path(st.log_path).relative_to(pod.log_directory).as_posix(),
            "attempt": st1.metadata.attempt,
            "restart_exit_code": st1.exit_code,
            "restart_log_name": Path(st1.log_path).relative_to(pod.log_directory).as_posix(),
            "restart_log": sorted(log_lines(Path(st1.log_path))),
            "containers_listed": sorted(c.metadata.attempt for c in cri.list_containers(pod_id)),
        }
    finally:
        cri.teardown_pod(pod_id)


def running_scenario(node, handler: str) -> dict:
    """A long-running container: exec, stats, log rotation with ReopenContainerLog, then StopContainer
    with a grace period the shell ignores (SIGTERM to a PID 1 without a handler), so SIGKILL ends it."""
    pod = new_pod(node, f"run-{handler}")
    loop = "i=0; while true; do echo tick-$i; i=$((i+1)); sleep 0.1; done"
    spec = ContainerSpec("main", BUSYBOX_REF, command=["sh", "-c", loop])
    cri = node.cri
    pod_id, [cid] = cri.start_pod(pod, handler, [spec])
    try:
        st = cri.wait_state(cid, RUNNING)
        log = Path(st.log_path)
        wait_until(lambda: log.exists() and "tick-3" in log.read_text(), 30, "ticks in the CRI log")
        ex = cri.exec_sync(cid, ["sh", "-c", "echo hi; echo oops >&2; exit 7"])
        try:
            cri.exec_sync(cid, ["/no/such/binary"])
            missing: tuple = ("no error",)
        except grpc.RpcError as e:
            missing = (e.code(), "no such file or directory" in (e.details() or ""))
        stats = cri.stats(cid=cid)
        assert len(stats) == 1, stats
        s = stats[0]
        # Log rotation as the kubelet does it: rename, then ask the runtime to reopen the path.
        rotated = log.with_suffix(".log.1")
        os.rename(log, rotated)
        cri.reopen_log(cid)
        wait_until(lambda: log.exists() and "tick-" in log.read_text(), 30, "the reopened CRI log")
        t0 = time.monotonic()
        cri.stop_container(cid, timeout_s=2)
        stopped = cri.wait_state(cid, EXITED)
        waited_grace = time.monotonic() - t0 >= 1.5
        return {
            "exec": (ex.stdout, ex.stderr, ex.exit_code),
            "exec_missing": missing,
            "stats_id": s.attributes.id == cid,
            "stats_name": s.attributes.metadata.name,
            "memory_working_set_positive": s.memory.working_set_bytes.value > 0,
            "cpu_positive": s.cpu.usage_core_nano_seconds.value > 0,
            "log_streams": {stream for stream, _, _ in log_lines(rotated)},
            "log_tags": {tag for _, tag, _ in log_lines(rotated)},
            "reopened_has_ticks": all(c.startswith("tick-") for _, _, c in log_lines(log)),
            "stop_exit_code": stopped.exit_code,
            "stop_reason": stopped.reason,
            "waited_grace": waited_grace,
        }
    finally:
        cri.teardown_pod(pod_id)


def oom_scenario(node, handler: str) -> dict:
    """memjob asks for 64 MiB under a 24 MiB memory limit: the cgroup OOM killer ends it."""
    pod = new_pod(node, f"oom-{handler}")
    spec = ContainerSpec(
        "main", MEMJOB_REF, command=["/bin/memjob", "--mib", "64", "--seed", "1"], memory_limit=24 << 20
    )
    pod_id, [cid] = node.cri.start_pod(pod, handler, [spec])
    try:
        st = node.cri.wait_state(cid, EXITED)
        return {"exit_code": st.exit_code, "reason": st.reason}
    finally:
        node.cri.teardown_pod(pod_id)


def both(node, scenario) -> dict[str, dict]:
    return {h: scenario(node, h) for h in HANDLERS}


def test_runtime_handlers_listed_with_the_nodes_settings_kept(cri_node) -> None:
    """The appended fragment adds `revenant` beside `runc`; the node's sandbox image and runc options stay."""
    out = _config_dump(cri_node.node)
    assert '[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.revenant]' in out
    assert 'runtime_type = "io.containerd.revenant.v1"' in out
    assert '[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]' in out
    assert f'sandbox_image = "{cri_node.node.pause_ref}"' in out
    assert f'Root = "{cri_node.node.runc_root}"' in out
    assert 'pod_annotations = ["revenant.io/*", "batch.kubernetes.io/job-completion-index"]' in out


def _config_dump(node) -> str:
    import subprocess

    res = subprocess.run(
        [node._containerd, "--config", str(node.config_path), "config", "dump"],
        capture_output=True,
        text=True,
        timeout=60,
        env=node.env,
    )
    assert res.returncode == 0, res.stderr
    return res.stdout


def test_exit_logs_and_restart_attempts_match_runc(cri_node) -> None:
    got = both(cri_node, exited_scenario)
    rev = got["revenant"]
    assert rev["exit_code"] == 3 and rev["reason"] == "Error" and rev["timestamps_set"]
    assert rev["log"] == [("stderr", "F", "err-0"), ("stdout", "F", "out-0")]
    assert (rev["log_name"], rev["restart_log_name"]) == ("main/0.log", "main/1.log")
    assert rev["attempt"] == 1 and rev["restart_exit_code"] == 3
    assert rev["restart_log"] == [("stderr", "F", "err-1"), ("stdout", "F", "out-1")]
    assert rev["containers_listed"] == [1]
    assert got["revenant"] == got["runc"]


def test_exec_stats_log_reopen_and_stop_match_runc(cri_node) -> None:
    got = both(cri_node, running_scenario)
    rev = got["revenant"]
    assert rev["exec"] == (b"hi\n", b"oops\n", 7)
    assert rev["exec_missing"] == (grpc.StatusCode.UNKNOWN, True)
    assert rev["stats_id"] and rev["stats_name"] == "main"
    assert rev["memory_working_set_positive"] and rev["cpu_positive"]
    assert rev["log_streams"] == {"stdout"} and rev["log_tags"] == {"F"}
    assert rev["reopened_has_ticks"]
    assert (rev["stop_exit_code"], rev["stop_reason"], rev["waited_grace"]) == (137, "Error", True)
    assert got["revenant"] == got["runc"]


def test_oom_killed_reason_matches_runc(cri_node) -> None:
    got = both(cri_node, oom_scenario)
    assert got["revenant"] == {"exit_code": 137, "reason": "OOMKilled"}
    assert got["revenant"] == got["runc"]


def shims_of(node) -> list[int]:
    """revenant shim processes serving this node (their command line names its containerd socket)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(a.endswith(b"containerd-shim-revenant-v1") for a in argv) and node.address.encode() in argv:
            pids.append(int(entry.name))
    return pids


def test_one_shim_per_pod(cri_node) -> None:
    """The pod's sandbox and all its containers share one revenant shim; a second pod gets its own."""
    specs = [
        ContainerSpec("a", BUSYBOX_REF, command=["sleep", "300"]),
        ContainerSpec("b", BUSYBOX_REF, command=["sleep", "300"]),
    ]
    pod1, pod2 = new_pod(cri_node, "shim-1"), new_pod(cri_node, "shim-2")
    before = set(shims_of(cri_node.node))
    id1, cids = cri_node.cri.start_pod(pod1, "revenant", specs)
    try:
        for cid in cids:
            cri_node.cri.wait_state(cid, RUNNING)
        one = set(shims_of(cri_node.node)) - before
        assert len(one) == 1, f"one pod (sandbox + 2 containers) should have one shim, found {one}"
        id2, _ = cri_node.cri.start_pod(pod2, "revenant", specs[:1])
        try:
            two = set(shims_of(cri_node.node)) - before
            assert len(two) == 2 and one < two, f"a second pod should get a second shim: {one} -> {two}"
        finally:
            cri_node.cri.teardown_pod(id2)
    finally:
        cri_node.cri.teardown_pod(id1)


@pytest.mark.parametrize("version", ["1.6", "1.7"])
def test_pulled_image_runs_under_both_handlers(version, cri_node_factory, _registry) -> None:
    """PullImage as the kubelet calls it, from the local registry through CRI's mirror setting; then the
    pulled image runs under either handler."""
    host = f"127.0.0.1:{_registry.port}"
    mirror = f"""
[plugins."io.containerd.grpc.v1.cri".registry.mirrors."{host}"]
  endpoint = ["http://{host}"]
"""
    node = cri_node_factory("pull", version, mirror)
    ref = f"{host}/revenant-k8s-{uuid.uuid4().hex[:8]}/busybox:test"
    # Into the registry under a new name, which CRI then does not have until it pulls it.
    node.node.ctr("images", "tag", BUSYBOX_REF, ref, namespace="k8s.io")
    node.node.ctr("images", "push", "--plain-http", ref, namespace="k8s.io", timeout=300)
    node.node.ctr("images", "rm", "--sync", ref, namespace="k8s.io")
    assert not node.cri.image_present(ref)
    image_ref = node.cri.pull_image(ref)
    assert image_ref.startswith("sha256:") and node.cri.image_present(ref)
    for handler in HANDLERS:
        pod = new_pod(node, f"pulled-{handler}")
        spec = ContainerSpec("main", ref, command=["sh", "-c", "echo pulled; exit 0"])
        pod_id, [cid] = node.cri.start_pod(pod, handler, [spec])
        try:
            st = node.cri.wait_state(cid, EXITED)
            repo = ref.rsplit(":", 1)[0]
            assert st.exit_code == 0 and st.image_ref.startswith(f"{repo}@sha256:"), (handler, st.image_ref)
            assert log_lines(Path(st.log_path)) == [("stdout", "F", "pulled")], handler
        finally:
            node.cri.teardown_pod(pod_id)
