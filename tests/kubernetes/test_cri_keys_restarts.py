"""Keys that survive re-creation, one claim per key, stops and restarts, all through CRI.

- An Indexed Job's pod (key template with `${job-completion-index}`) lost with node A is replaced on
  node B by a pod with a NEW name and the same index: it resumes (memjob checksum, writable layer).
- A second live pod claiming a key on the node is refused, naming the first; a key template that
  cannot be resolved fails the container's start with the reason.
- StopContainer with a grace period (pod deletion, drain) and checkpoint-on-stop: the final checkpoint
  commits within the grace period and the next pod resumes with nothing lost.
- The kubelet's restart of a crashed container in its pod: fresh by default; with restore-on-restart
  the last checkpoint, and the crash-loop guard's fallback to the one before it, then a fresh start.
Real parts: containerd 1.6 / 1.7 with CRI and CNI, runc, CRIU, the revenant shim, a file:// store.
"""

from __future__ import annotations

import os
import shlex
import signal
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from harness.cri import EXITED, RUNNING, ContainerSpec, PodSpec
from harness.images import MEMJOB_REF
from harness.memjob import assert_continuous, expected_checksum, memjob_args, read_steps, wait_for_step
from harness.protect import EventWatcher, destroy_node, shim_log
from harness.wait import wait_until

from .conftest import VERSIONS
from .test_cri_protect import cri_log_steps, job_log, last_seq, netns_of, record, store_list, task_pid

pytestmark = pytest.mark.timeout(600)

MIB, SEED = 32, 29
MARKER = "/data/marker"
INDEX = "batch.kubernetes.io/job-completion-index"


@dataclass
class Pod:
    """A memjob pod as a controller would create it: name, namespace and annotations from its template."""

    name: str
    annotations: dict[str, str]
    namespace: str = "ml"
    marker: str = field(default_factory=lambda: uuid.uuid4().hex)
    spec: PodSpec | None = None
    container: ContainerSpec | None = None
    pod_id: str = ""

    def start(self, node) -> str:
        self.spec = PodSpec(
            name=self.name,
            namespace=self.namespace,
            annotations=self.annotations,
            log_directory=str(node.logs / self.name),
        )
        job = shlex.join(memjob_args(MIB, SEED))
        script = f"mkdir -p /data && [ -f {MARKER} ] || echo {shlex.quote(self.marker)} > {MARKER}; exec {job}"
        self.container = ContainerSpec("main", MEMJOB_REF, command=["sh", "-c", script])
        self.pod_id = node.cri.run_pod(self.spec, "revenant")
        cid = node.cri.create_container(self.pod_id, self.spec, self.container)
        node.cri.start_container(cid)
        node.cri.wait_state(cid, RUNNING)
        return cid

    def restart(self, node) -> str:
        """The kubelet's restart of an exited container: the next attempt is created in the same sandbox
        while the exited one stays (for `kubectl logs --previous`)."""
        assert self.spec is not None and self.container is not None
        self.container = ContainerSpec(**{**self.container.__dict__, "attempt": self.container.attempt + 1})
        cid = node.cri.create_container(self.pod_id, self.spec, self.container)
        node.cri.start_container(cid)
        node.cri.wait_state(cid, RUNNING)
        return cid


# ctr 1.7 drops an event whose payload type (google.protobuf.StringValue, the /revenant/restore event) it
# has not registered instead of printing it; the system's ctr 1.6 prints it, from either node.
SYSTEM_CTR = "/usr/bin/ctr"


def crash(node, cid: str) -> None:
    """The job dies on its own (SIGKILL from outside: no stop signal through the shim, no final checkpoint)."""
    os.kill(task_pid(node, cid), signal.SIGKILL)
    node.cri.wait_state(cid, EXITED)


def check_resumed(node, cid: str, pod: Pod, memjob_binary: Path) -> list:
    log = job_log(node, cid)
    wait_until(lambda: read_steps(log), 120, "the job running")
    steps = wait_for_step(log, read_steps(log)[-1].n + 3, 120)
    assert_continuous(steps)
    last = steps[-1]
    assert last.checksum == expected_checksum(memjob_binary, MIB, SEED, last.n), "memory differs after restore"
    assert (node.rootfs(cid) / MARKER.lstrip("/")).read_text().strip() == pod.marker, "writable layer not back"
    return steps


@pytest.fixture
def store(tmp_path: Path) -> str:
    return f"file://{tmp_path / 'store'}"


@pytest.mark.parametrize("version", VERSIONS)
def test_indexed_job_pod_resumes_on_b_under_a_new_name(version, cri_node_factory, store, test_images) -> None:
    template = {
        "revenant.io/checkpoint-key": "${namespace}/trainer/shard-${job-completion-index}",
        "revenant.io/store": store,
        "revenant.io/checkpoint-interval": "2s",
        INDEX: "3",
    }
    a = cri_node_factory("a", version)
    first = Pod(f"trainer-{uuid.uuid4().hex[:5]}-3", dict(template))
    cid = first.start(a)
    wait_until(lambda: last_seq(a, cid) >= 2, 120, "two periodic checkpoints on A")
    assert record(a, cid)["key"] == "ml/trainer/shard-3"
    seq = last_seq(a, cid)
    a.close()
    destroy_node(a.node)  # no notice

    b = cri_node_factory("b", version)
    second = Pod(f"trainer-{uuid.uuid4().hex[:5]}-3", dict(template), marker=first.marker)
    assert second.name != first.name
    cid_b = second.start(b)
    steps = check_resumed(b, cid_b, second, test_images.memjob_binary)
    rec = record(b, cid_b)
    assert rec["key"] == "ml/trainer/shard-3" and rec["pod"] == second.name, rec
    assert rec.get("restored_from", 0) >= seq, f"B restored {rec.get('restored_from')}, A had committed {seq}"
    assert steps[0].n == 1, "B's job log should be A's, carried over in the writable layer"
    assert netns_of(rec["task_pid"]) == netns_of(task_pid(b, second.pod_id)), "the job is outside the pod's netns"
    assert b.cri.pod_ip(second.pod_id), "no pod address on B"


def test_second_pod_claiming_a_key_is_refused(cri_node, store) -> None:
    key = f"ml/shared-{uuid.uuid4().hex[:8]}"
    annotations = {"revenant.io/checkpoint-key": key, "revenant.io/store": store}
    first = Pod(f"one-{uuid.uuid4().hex[:5]}", dict(annotations))
    cid = first.start(cri_node)
    second = Pod(f"two-{uuid.uuid4().hex[:5]}", dict(annotations))
    try:
        with pytest.raises(grpc.RpcError) as refused:
            second.start(cri_node)
        text = refused.value.details()
        assert f"checkpoint key {key!r} is already claimed by pod ml/{first.name} container main" in text, text
        assert cid in text, text
        # Once the first is gone, the key is free again.
        cri_node.cri.teardown_pod(first.pod_id)
        third = Pod(f"three-{uuid.uuid4().hex[:5]}", dict(annotations))
        cri_node.cri.wait_state(third.start(cri_node), RUNNING)
    finally:
        cri_node.cri.remove_all_pods()


def test_unresolvable_key_template_fails_with_the_reason(cri_node, store) -> None:
    annotations = {
        "revenant.io/checkpoint-key": "${namespace}/shard-${job-completion-index}",
        "revenant.io/store": store,
    }
    pod = Pod(f"plain-{uuid.uuid4().hex[:5]}", annotations)  # not an Indexed Job: no completion index
    try:
        with pytest.raises(grpc.RpcError) as refused:
            pod.start(cri_node)
        assert "no batch.kubernetes.io/job-completion-index annotation" in refused.value.details()
    finally:
        cri_node.cri.remove_all_pods()


def test_stop_with_grace_period_checkpoints_and_the_next_pod_resumes(cri_node, store, test_images) -> None:
    """Pod deletion / drain: StopContainer(timeout=30) sends SIGTERM; with checkpoint-on-stop the shim
    takes the final checkpoint inside the grace period, and the pod re-created resumes from it."""
    annotations = {
        "revenant.io/checkpoint-key": f"ml/stop-{uuid.uuid4().hex[:8]}",
        "revenant.io/store": store,
        "revenant.io/checkpoint-interval": "off",
        "revenant.io/checkpoint-on-stop": "true",
    }
    key = annotations["revenant.io/checkpoint-key"]
    pod = Pod(f"stopper-{uuid.uuid4().hex[:5]}", dict(annotations))
    try:
        cid = pod.start(cri_node)
        wait_for_step(job_log(cri_node, cid), 5)
        assert not store_list(store, key)
        started = time.monotonic()
        cri_node.cri.stop_container(cid, timeout_s=30)
        st = cri_node.cri.wait_state(cid, EXITED, timeout=5)
        assert time.monotonic() - started < 30, "the stop ran into the grace period's SIGKILL"
        (ckpt,) = store_list(store, key)
        assert ckpt.metadata["exit"] is True and ckpt.metadata["reason"] == "stop signal 15", ckpt.metadata
        steps_a = cri_log_steps(Path(st.log_path))
        cri_node.cri.teardown_pod(pod.pod_id)

        again = Pod(pod.name, dict(annotations), marker=pod.marker)
        cid2 = again.start(cri_node)
        steps = check_resumed(cri_node, cid2, again, test_images.memjob_binary)
        assert record(cri_node, cid2).get("restored_from") == ckpt.seq
        assert steps_a and steps_a[-1] in {s.n for s in steps}, "the final checkpoint lost a step"
    finally:
        cri_node.cri.remove_all_pods()


def test_crash_restart_without_the_policy_starts_fresh(cri_node, store) -> None:
    annotations = {
        "revenant.io/checkpoint-key": f"ml/crash-{uuid.uuid4().hex[:8]}",
        "revenant.io/store": store,
        "revenant.io/checkpoint-interval": "2s",
    }
    pod = Pod(f"crashy-{uuid.uuid4().hex[:5]}", dict(annotations))
    try:
        cid = pod.start(cri_node)
        wait_until(lambda: last_seq(cri_node, cid) >= 1, 120, "a periodic checkpoint")
        crash(cri_node, cid)
        cid1 = pod.restart(cri_node)
        wait_until(lambda: read_steps(job_log(cri_node, cid1)), 60, "the restarted job running")
        rec = record(cri_node, cid1)
        assert not rec.get("restored_from"), f"restored without restore-on-restart: {rec}"
        assert "restore-on-restart is off" in (rec.get("fresh_reason") or ""), rec
        assert "exit status 137" in rec["fresh_reason"], rec
        assert read_steps(job_log(cri_node, cid1))[0].n == 1, "not a fresh start"
    finally:
        cri_node.cri.remove_all_pods()


def test_crash_loop_guard_falls_back_then_starts_fresh(cri_node, store, tmp_path: Path, test_images) -> None:
    key = f"ml/loop-{uuid.uuid4().hex[:8]}"
    annotations = {
        "revenant.io/checkpoint-key": key,
        "revenant.io/store": store,
        "revenant.io/checkpoint-interval": "2s",
        "revenant.io/keep": "10",
        "revenant.io/restore-on-restart": "true",
        "revenant.io/crash-loop-window": "8s",
    }
    pod = Pod(f"looper-{uuid.uuid4().hex[:5]}", dict(annotations))
    events = EventWatcher(cri_node.node, tmp_path / "events.txt", ctr=SYSTEM_CTR)
    try:
        cid = pod.start(cri_node)
        started = time.monotonic()
        wait_until(lambda: last_seq(cri_node, cid) >= 3, 120, "three periodic checkpoints")
        time.sleep(max(0.0, 9 - (time.monotonic() - started)))  # outlive the window: a long run, then a crash
        crash(cri_node, cid)
        newest = max(i.seq for i in store_list(store, key))

        cid1 = pod.restart(cri_node)  # restores the newest checkpoint
        rec1 = record(cri_node, cid1)
        assert rec1.get("restored_from") == newest, rec1
        check_resumed(cri_node, cid1, pod, test_images.memjob_binary)
        crash(cri_node, cid1)  # within the window: the restored state is suspect

        cid2 = pod.restart(cri_node)  # the checkpoint before it
        rec2 = record(cri_node, cid2)
        assert rec2.get("restored_from") and rec2["restored_from"] < newest, rec2
        assert f"crash-loop guard: the restore from seq {newest} exited" in rec2["restart_reason"], rec2
        check_resumed(cri_node, cid2, pod, test_images.memjob_binary)
        crash(cri_node, cid2)

        cid3 = pod.restart(cri_node)  # then a fresh start
        rec3 = record(cri_node, cid3)
        assert not rec3.get("restored_from"), rec3
        assert f"the restore from seq {rec2['restored_from']} exited" in rec3["fresh_reason"], rec3
        assert "starting fresh" in rec3["fresh_reason"], rec3
        wait_until(lambda: read_steps(job_log(cri_node, cid3)), 60, "the fresh job running")
        assert read_steps(job_log(cri_node, cid3))[0].n == 1, "not a fresh start"
        wait_until(lambda: [e for e in events.lines("/revenant/restore") if "starting fresh" in e], 30, "the event")
        assert any("falling back" in e for e in events.lines("/revenant/restore")), events.lines("/revenant/restore")
        assert "crash-loop guard" in shim_log(cri_node.node)
    finally:
        events.stop()
        cri_node.cri.remove_all_pods()
