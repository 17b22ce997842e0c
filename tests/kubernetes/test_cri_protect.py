"""Protected pods through CRI: a memjob pod with `revenant.io/checkpoint-key` on the pod, under the
`revenant` runtime handler, moves from node A to node B when B re-creates a pod of the same name
(StatefulSet style) -- after A is lost without notice (at most one checkpoint interval lost), or after a
spot notice, when a real `revenant agent` checkpoints every protected pod of the node (nothing lost).

Proofs: memjob's checksum recomputed on the host (process memory), a marker file in the writable layer,
the job's steps continuing in B's CRI log (stdout re-wired to B's log pipe, CRI format), B's pod address
(the pod's new network namespace given to the restored process), and the agent's metrics naming the pod.
Real parts: containerd 1.6 / 1.7 with CRI and CNI, runc, CRIU, the revenant shim, a file:// store.
"""

from __future__ import annotations

import json
import os
import shlex
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from harness.cri import EXITED, RUNNING, ContainerSpec, PodSpec, read_cri_log
from harness.images import MEMJOB_REF, _rootfs_layer, write_oci_archive
from harness.memjob import (
    LOG_IN_CONTAINER,
    STEP_LINE,
    assert_continuous,
    expected_checksum,
    memjob_args,
    read_steps,
    wait_for_step,
)
from harness.protect import destroy_node
from harness.wait import wait_until

from .conftest import VERSIONS

pytestmark = pytest.mark.timeout(600)

MIB, SEED = 32, 23
MARKER = "/data/marker"
POD = "trainer-0"


@dataclass
class ProtectedPod:
    key: str
    store: str
    marker: str

    def pod(self, node) -> PodSpec:
        annotations = {
            "revenant.io/checkpoint-key": self.key,
            "revenant.io/store": self.store,
            "revenant.io/checkpoint-interval": "2s",
        }
        return PodSpec(name=POD, namespace="ml", annotations=annotations, log_directory=str(node.logs / POD))

    def container(self) -> ContainerSpec:
        job = shlex.join(memjob_args(MIB, SEED))
        script = f"mkdir -p /data && echo {shlex.quote(self.marker)} > {MARKER} && exec {job}"
        return ContainerSpec("main", MEMJOB_REF, command=["sh", "-c", script])

    def start(self, node) -> tuple[str, str]:
        pod_id, [cid] = node.cri.start_pod(self.pod(node), "revenant", [self.container()])
        node.cri.wait_state(cid, RUNNING)
        return pod_id, cid


def store_list(url: str, key: str) -> list:
    from shim.store import open_store

    store = open_store(url)
    try:
        return store.list(key)
    finally:
        store.close()


def job_log(node, cid: str) -> Path:
    return node.rootfs(cid) / LOG_IN_CONTAINER.lstrip("/")


def record(node, cid: str) -> dict:
    path = node.node.revenant_run_dir / "tasks" / "k8s.io" / f"{cid}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def last_seq(node, cid: str) -> int:
    return int((record(node, cid).get("last_checkpoint") or {}).get("seq") or 0)


def protected_ids(node) -> list[str]:
    return sorted(p.stem for p in (node.node.revenant_run_dir / "tasks" / "k8s.io").glob("*.json"))


def cri_log_steps(path: Path) -> list[int]:
    steps = []
    for _ts, stream, tag, content in read_cri_log(path):
        m = STEP_LINE.match(content)
        if m and (stream, tag) == ("stdout", "F"):
            steps.append(int(m[1]))
    return steps


def resume_on_b(b, job: ProtectedPod, memjob_binary: Path) -> tuple[dict, list]:
    """B re-creates the pod of the same name; the job must pick up where its checkpoint left it."""
    pod_id, cid = job.start(b)
    log_b = job_log(b, cid)
    wait_until(lambda: read_steps(log_b), 120, "the job running on B")
    steps = wait_for_step(log_b, read_steps(log_b)[-1].n + 3, 120)
    assert_continuous(steps)
    last = steps[-1]
    assert last.checksum == expected_checksum(memjob_binary, MIB, SEED, last.n), "memory differs after restore"
    assert (b.rootfs(cid) / MARKER.lstrip("/")).read_text().strip() == job.marker, "writable layer not back"
    ip = b.cri.pod_ip(pod_id)
    assert ip.startswith(b.node.subnet.rsplit(".", 2)[0] + "."), f"B's pod address {ip!r} is not in {b.node.subnet}"
    # stdout goes to B's CRI log: steps after the restored one, in CRI format.
    log = Path(b.cri.status(cid).log_path)
    wait_until(lambda: [n for n in cri_log_steps(log) if n > steps[0].n], 60, "steps in B's CRI log")
    rec = record(b, cid)
    assert rec.get("restored_from"), f"B started fresh instead of restoring: {rec}"
    # The restored process joined B's pod network namespace (CRIU's external netns), not a new one.
    assert netns_of(rec["task_pid"]) == netns_of(task_pid(b, pod_id)), "the job is outside the pod's netns"
    return rec, steps


def task_pid(node, task_id: str) -> int:
    for line in node.node.ctr("tasks", "ls", namespace="k8s.io").stdout.splitlines()[1:]:
        fields = line.split()
        if fields and fields[0] == task_id:
            return int(fields[1])
    raise AssertionError(f"no task {task_id} on {node.node.name}")


def netns_of(pid: int) -> str:
    return os.readlink(f"/proc/{pid}/ns/net")


@pytest.fixture
def job(tmp_path: Path) -> ProtectedPod:
    return ProtectedPod(
        key=f"ml/{uuid.uuid4().hex[:10]}/main", store=f"file://{tmp_path / 'store'}", marker=uuid.uuid4().hex
    )


@pytest.mark.parametrize("version", VERSIONS)
def test_pod_resumes_on_b_after_node_a_is_lost(version, cri_node_factory, job, test_images) -> None:
    a = cri_node_factory("a", version)
    _pod_id, cid = job.start(a)
    wait_until(lambda: last_seq(a, cid) >= 2, 120, "two periodic checkpoints on A")
    assert protected_ids(a) == [cid], "only the app container is protected, never the pod sandbox"
    rec = record(a, cid)
    assert (rec["pod"], rec["pod_namespace"], rec["container"]) == (POD, "ml", "main")
    # The checkpoint names the image containerd runs (asked in a child process: the pod's long-lived
    # shim never loads grpc).
    (info, *_) = store_list(job.store, job.key)
    image = info.metadata.get("image") or {}
    assert image.get("name") == MEMJOB_REF and image.get("digest", "").startswith("sha256:"), info.metadata
    assert b"cygrpc" not in Path(f"/proc/{rec['shim_pid']}/maps").read_bytes(), "grpc loaded into the shim"
    a.close()
    seq = last_seq(a, cid)
    destroy_node(a.node)  # no notice: containerd, the shim and the pod die with the node

    b = cri_node_factory("b", version)
    rec_b, steps_b = resume_on_b(b, job, test_images.memjob_binary)
    # At most one interval lost: B restored the newest checkpoint A had committed.
    assert rec_b["restored_from"] >= seq, f"B restored seq {rec_b['restored_from']}, A had committed {seq}"
    assert steps_b[0].n == 1, "B's log should be A's log carried over in the writable layer"


@pytest.mark.parametrize("version", VERSIONS)
def test_spot_notice_moves_the_pod_with_nothing_lost(
    version, cri_node_factory, job, test_images, metadata_server, agent_factory
) -> None:
    a = cri_node_factory("a", version)
    _pod_id, cid = job.start(a)
    wait_until(lambda: last_seq(a, cid) >= 1, 120, "a periodic checkpoint on A")
    agent = agent_factory(a.node.revenant_run_dir, metadata_server.url)
    # The metrics name the pod while its task lives (CRI deletes the task, and its record, once the
    # final checkpoint has ended it).
    labels = f'pod="{POD}",pod_namespace="ml",container="main"'
    wait_until(
        lambda: any(
            line.startswith("revenant_task_last_checkpoint_seq{") and labels in line
            for line in agent_metrics(agent).splitlines()
        ),
        30,
        "the agent's metrics naming the pod",
    )
    metadata_server.aws_terminate(120)
    summary = agent.wait_drain()
    assert summary.get("ok") is True, agent.text()
    (result,) = agent.results()  # every protected pod of the node, and only the app container
    assert result["status"] == "ok" and result["exit"] is True, result
    st = a.cri.wait_state(cid, EXITED, timeout=60)  # the agent's final checkpoint ends the task
    # The rootfs went with the task (CRI deletes an exited task); A's CRI log stays: all A printed.
    steps_a = cri_log_steps(Path(st.log_path))
    assert steps_a, "no steps in A's CRI log"
    a.close()
    destroy_node(a.node)

    b = cri_node_factory("b", version)
    rec_b, steps_b = resume_on_b(b, job, test_images.memjob_binary)
    assert rec_b["restored_from"] == result["seq"], "B did not restore the agent's final checkpoint"
    assert steps_a[-1] in {s.n for s in steps_b}, "the final checkpoint lost a step A had made"


def agent_metrics(agent) -> str:
    port = next(e["port"] for e in agent.events() if e.get("event") == "listening")
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        return resp.read().decode()


def test_a_changed_image_starts_fresh(cri_node_factory, job, test_images, tmp_path: Path) -> None:
    """B runs another image under the same name: the checkpoint is not restored onto it (old memory
    against new binaries); the pod starts fresh and the record says why."""
    a = cri_node_factory("a", VERSIONS[0])
    _pod_id, cid = job.start(a)
    wait_until(lambda: last_seq(a, cid) >= 1, 120, "a periodic checkpoint on A")
    a.close()
    destroy_node(a.node)

    b = cri_node_factory("b", VERSIONS[0])
    changed = write_oci_archive(
        tmp_path / "memjob-v2.tar",
        MEMJOB_REF,
        _rootfs_layer({"bin/memjob": (test_images.memjob_binary.read_bytes(), 0o755), "etc/v2": (b"2\n", 0o644)}),
        ["/bin/memjob"],
    )
    b.node.ctr("images", "import", str(changed), namespace="k8s.io", timeout=300)
    _pod_b, cid_b = job.start(b)
    wait_until(lambda: read_steps(job_log(b, cid_b)), 120, "the job running on B")
    rec = record(b, cid_b)
    assert not rec.get("restored_from"), f"restored onto a changed image: {rec}"
    assert "image differs" in (rec.get("fresh_reason") or ""), rec
    assert read_steps(job_log(b, cid_b))[0].n == 1
