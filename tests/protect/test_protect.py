"""Transparent protection end to end: a memjob protected by annotations on node A, node A lost,
the same `ctr run` on node B resumes it. memjob's checksum (recomputed on the host with --replay) proves
the process memory came back; a marker file the job wrote into its writable layer proves the filesystem.

Every scenario uses real containerd nodes, the revenant shim, CRIU, a real `revenant agent` process,
the local AWS metadata server and a file:// or S3 (SeaweedFS) store. No timing assertions.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from harness.containerd import ContainerdNode
from harness.memjob import (
    assert_continuous,
    expected_checksum,
    read_steps,
    wait_for_step,
)
from harness.protect import (
    EventWatcher,
    Job,
    checkpointed_steps,
    destroy_node,
    job_log,
    last_seq,
    marker_of,
    registry_record,
    run_job,
    shim_log,
    store_checkpoints,
    task_status,
    wait_for_seq,
    wait_stopped,
)
from harness.store_util import newest_and_older_chunks
from harness.wait import wait_until

pytestmark = pytest.mark.timeout(900)


@dataclass
class Cluster:
    a: ContainerdNode
    b: ContainerdNode
    image_a: str
    image_b: str
    memjob_binary: Path
    tmp: Path

    def resume_on_b(self, job: Job, timeout: float = 120) -> list:
        """Plain `ctr run` with the same key on B; returns the job's steps once it has run on."""
        run_job(self.b, self.image_b, job)
        log_b = job_log(self.b, job.cid)
        wait_until(lambda: read_steps(log_b), timeout, f"{job.cid} running on B")
        first = read_steps(log_b)[-1].n
        return wait_for_step(log_b, first + 3, timeout)

    def check_memory(self, job: Job, steps: list) -> None:
        """The last step's checksum equals the host's recomputation: every page came back."""
        last = steps[-1]
        assert last.checksum == expected_checksum(self.memjob_binary, job.mib, job.seed, last.n), (
            f"{job.cid}: memory differs after restore at step {last.n}"
        )


@pytest.fixture
def cluster(node_factory: Callable[..., ContainerdNode], test_images, tmp_path: Path) -> Cluster:
    a, b = node_factory("a"), node_factory("b")
    return Cluster(
        a,
        b,
        a.import_image(test_images.memjob),
        b.import_image(test_images.memjob),
        test_images.memjob_binary,
        tmp_path,
    )


# Fixture order matters: a test takes store_url BEFORE cluster, so the S3 credentials are in the
# environment the nodes' containerd (and so the shims) inherit.
@pytest.fixture(params=["file", "s3"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "file":
        return f"file://{tmp_path / 'store'}"
    return request.getfixturevalue("s3_server").url


def new_key() -> str:
    return f"test/{uuid.uuid4().hex[:10]}/main"


def test_spot_notice_moves_the_job_to_node_b(store_url: str, cluster: Cluster, metadata_server, agent_factory) -> None:
    """The demo: periodic checkpoints on A, a spot notice, the agent's final checkpoint, A destroyed,
    B resumes from the agent's checkpoint with memory and filesystem intact and no step lost."""
    job = Job("job", new_key(), store_url, marker=f"marker-{uuid.uuid4().hex[:8]}")
    run_job(cluster.a, cluster.image_a, job)
    wait_for_seq(cluster.a, job.cid, 2)  # two periodic checkpoints
    agent = agent_factory(cluster.a.revenant_run_dir, metadata_server.url)
    metadata_server.aws_terminate(120)
    summary = agent.wait_drain()
    assert summary.get("ok") is True, agent.text()
    (result,) = agent.results()
    assert result["status"] == "ok" and result["exit"] is True, result
    wait_stopped(cluster.a, job.cid)
    steps_a = read_steps(job_log(cluster.a, job.cid))
    assert marker_of(cluster.a, job.cid) == job.marker
    final_seq = result["seq"]
    destroy_node(cluster.a)

    steps_b = cluster.resume_on_b(job)
    assert marker_of(cluster.b, job.cid) == job.marker, "the writable layer did not come back"
    assert_continuous(steps_b)
    assert steps_b[0].n == 1, "B's log should be A's log carried over, then continued"
    # The final checkpoint was taken with the task frozen for good: nothing A did is lost.
    assert steps_a[-1].n in {s.n for s in steps_b}
    cluster.check_memory(job, steps_b)
    rec = registry_record(cluster.b, job.cid)
    assert rec is not None and rec["restored_from"] == final_seq, rec
    # Where the restore's time went (shim/protect/restore_breakdown.py), recorded by the shim.
    parts = rec["restore"]
    assert parts["prepare_fetch_ms"] > 0 and parts["fetch"]["bytes_written"] > 0, parts
    assert parts["fetch"]["chunks"] > 0 and parts["fetch"]["slowest_files"], parts
    assert parts["runc_own_ms"] > 0 and parts["criu_restore_other_ms"] > 0, parts
    assert parts["total_ms"] >= parts["prepare_fetch_ms"] + parts["criu_restore_other_ms"], parts


def test_node_lost_without_notice_resumes_from_last_periodic(cluster: Cluster, tmp_path: Path) -> None:
    job = Job("job", new_key(), f"file://{tmp_path / 'store'}", interval="3s", interval_ms=200)
    run_job(cluster.a, cluster.image_a, job)
    seq = wait_for_seq(cluster.a, job.cid, 2)
    wait_for_step(job_log(cluster.a, job.cid), read_steps(job_log(cluster.a, job.cid))[-1].n + 3)
    steps_a = read_steps(job_log(cluster.a, job.cid))
    seq = last_seq(cluster.a, job.cid)
    destroy_node(cluster.a)  # SIGKILL: containerd, shim, job; no final checkpoint

    steps_b = cluster.resume_on_b(job)
    assert_continuous(steps_b)
    rec = registry_record(cluster.b, job.cid)
    assert rec is not None and rec["restored_from"] >= seq, rec
    at_checkpoint = checkpointed_steps(job.store, job.key, rec["restored_from"], tmp_path)[-1].n
    lost = steps_a[-1].n - at_checkpoint
    # memjob steps every 200 ms at most 5 steps a second; one 3 s interval (plus the upload it waits
    # for, bounded generously) is the most a periodic checkpoint may be behind.
    assert 0 <= lost <= 5 * (3 + 3), f"lost {lost} steps (A reached {steps_a[-1].n}, checkpoint at {at_checkpoint})"
    cluster.check_memory(job, steps_b)


def _uploads_started(node: ContainerdNode, cid: str) -> int:
    return shim_log(node).count(f"uploading checkpoint of {node.namespace}/{cid}: 0/")


def test_notice_during_a_periodic_checkpoint(s3_server, cluster: Cluster, metadata_server, agent_factory) -> None:
    """The S3 upload of a periodic checkpoint takes seconds here: the notice lands in the middle of one.
    The final checkpoint waits for it, then commits after it; B resumes from the final one."""
    job = Job("job", new_key(), s3_server.url)
    run_job(cluster.a, cluster.image_a, job)
    wait_for_seq(cluster.a, job.cid, 1, timeout=180)
    agent = agent_factory(cluster.a.revenant_run_dir, metadata_server.url)
    wait_until(lambda: _uploads_started(cluster.a, job.cid) >= 2, 60, "the second periodic upload to start")
    in_flight = last_seq(cluster.a, job.cid) + 1
    metadata_server.aws_terminate(120)
    agent.wait_drain(timeout=240)
    (result,) = agent.results()
    assert result["status"] == "ok", agent.text()
    assert result["seq"] > in_flight - 1, result
    wait_stopped(cluster.a, job.cid)
    steps_a = read_steps(job_log(cluster.a, job.cid))
    destroy_node(cluster.a)

    steps_b = cluster.resume_on_b(job)
    rec = registry_record(cluster.b, job.cid)
    assert rec is not None and rec["restored_from"] == result["seq"], rec
    assert steps_a[-1].n in {s.n for s in steps_b}, "steps lost despite the notice"
    assert_continuous(steps_b)
    cluster.check_memory(job, steps_b)


def test_one_notice_checkpoints_every_protected_container_and_leaves_others_alone(
    cluster: Cluster, tmp_path: Path, metadata_server, agent_factory
) -> None:
    store = f"file://{tmp_path / 'store'}"
    jobs = [Job(f"job{i}", new_key(), store, seed=20 + i, marker=f"m{i}-{uuid.uuid4().hex[:6]}") for i in range(2)]
    for job in jobs:
        run_job(cluster.a, cluster.image_a, job)
    # Same runtime, no checkpoint key: revenant must leave it alone.
    free = Job("free", "", store)
    run_job(
        cluster.a,
        cluster.image_a,
        free,
        annotations={},
        command=["/bin/memjob", "--mib", "16", "--mutate", "0.05", "--seed", "3", "--interval-ms", "200"],
    )
    for job in jobs:
        wait_for_seq(cluster.a, job.cid, 1)
    assert registry_record(cluster.a, "free") is None
    agent = agent_factory(cluster.a.revenant_run_dir, metadata_server.url)
    metadata_server.aws_terminate(120)
    agent.wait_drain()
    results = {r["id"]: r for r in agent.results()}
    assert set(results) == {"job0", "job1"}, agent.text()
    assert all(r["status"] == "ok" for r in results.values()), results
    for job in jobs:
        wait_stopped(cluster.a, job.cid)
    assert task_status(cluster.a, "free") == "RUNNING", "the unprotected task was stopped"
    assert registry_record(cluster.a, "free") is None
    log_a = shim_log(cluster.a)
    assert f"{cluster.a.namespace}/free is protected" not in log_a
    assert "checkpointed free" not in log_a and f"of {cluster.a.namespace}/free" not in log_a
    assert not list(cluster.a.bundle("free").glob("checkpoint*")), "something checkpointed the unprotected task"
    last_a = {job.cid: read_steps(job_log(cluster.a, job.cid))[-1].n for job in jobs}
    destroy_node(cluster.a)

    for job in jobs:
        steps_b = cluster.resume_on_b(job)
        assert marker_of(cluster.b, job.cid) == job.marker
        assert last_a[job.cid] in {s.n for s in steps_b}
        cluster.check_memory(job, steps_b)


def test_store_down_at_notice_time(s3_server, cluster: Cluster, metadata_server, agent_factory) -> None:
    """The final checkpoint cannot be stored: the agent reports the failure clearly, the job keeps
    running on A; the last good periodic checkpoint stays; B restores it once the store is back."""
    job = Job("job", new_key(), s3_server.url, interval="2s")
    run_job(cluster.a, cluster.image_a, job)
    good = wait_for_seq(cluster.a, job.cid, 1, timeout=180)
    agent = agent_factory(cluster.a.revenant_run_dir, metadata_server.url)
    s3_server.stop()
    try:
        good = last_seq(cluster.a, job.cid)  # a periodic one may have committed just before
        metadata_server.aws_terminate(120)
        agent.wait_drain(timeout=240)
        (result,) = agent.results()
        assert result["status"] == "failed", result
        assert "store" in result["error"].lower() or "s3://" in result["error"], result["error"]
        rec = registry_record(cluster.a, job.cid)
        assert rec is not None and rec["last_error"], rec
        # The final checkpoint was not committed, so the task was not stopped: the job runs on.
        assert task_status(cluster.a, job.cid) == "RUNNING"
    finally:
        destroy_node(cluster.a)
        s3_server.start()
    seqs = [c.seq for c in store_checkpoints(job.store, job.key)]
    assert seqs and max(seqs) >= good, seqs

    steps_b = cluster.resume_on_b(job)
    rec = registry_record(cluster.b, job.cid)
    assert rec is not None and rec["restored_from"] == max(seqs), rec
    assert marker_of(cluster.b, job.cid) == job.marker
    cluster.check_memory(job, steps_b)


def _flip_byte_in_newest(store_url: str, key: str) -> tuple[int, str]:
    """Damage one chunk of the newest checkpoint's files that no older checkpoint references; returns (seq,
    digest). A file's chunk, not one of its page table's: a restore does not read the table (the next
    incremental checkpoint does), so damage there would not stop the restore."""
    from shim.store import open_store

    store = open_store(store_url)
    try:
        newest, m, older = newest_and_older_chunks(store, key)
        own = sorted(m.file_digests() - older)
    finally:
        store.close()
    assert own, "the newest checkpoint shares every chunk with older ones"
    path = Path(store_url.removeprefix("file://").split("?")[0]) / "chunks" / own[0][:2] / own[0]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.chmod(0o644)
    path.write_bytes(bytes(data))
    return newest, own[0]


def test_damaged_latest_checkpoint_falls_back_to_the_previous(cluster: Cluster, tmp_path: Path) -> None:
    # Loose chunk files (?packs=0) so the test can reach one chunk on disk and damage it.
    job = Job("job", new_key(), f"file://{tmp_path / 'store'}?packs=0")
    run_job(cluster.a, cluster.image_a, job)
    wait_for_seq(cluster.a, job.cid, 2)
    destroy_node(cluster.a)
    newest, digest = _flip_byte_in_newest(job.store, job.key)

    steps_b = cluster.resume_on_b(job)
    rec = registry_record(cluster.b, job.cid)
    assert rec is not None and rec["restored_from"] == newest - 1, rec
    assert digest in shim_log(cluster.b) or f"seq {newest}" in shim_log(cluster.b)
    assert marker_of(cluster.b, job.cid) == job.marker
    cluster.check_memory(job, steps_b)


def _forge_newest(store_url: str, key: str, planted: Path) -> int:
    """Rewrite the newest checkpoint's manifest (valid digest) with an entry at an absolute host path."""
    from harness.store_util import frame_manifest, manifest_doc
    from shim.store import open_store

    store = open_store(store_url)
    try:
        committed = store._committed(key)
        newest = max(committed)
        doc = manifest_doc(store, key, committed[newest])
        doc["entries"].append(
            {
                "path": str(planted),
                "type": "file",
                "mode": 0o4755,
                "mtime": 0.0,
                "uid": 0,
                "gid": 0,
                "size": 1,
                "chunks": [],
            }
        )
        store.backend.put_manifest(key, committed[newest], frame_manifest(json.dumps(doc).encode()), set())
    finally:
        store.close()
    return newest


def test_hostile_latest_checkpoint_restores_the_previous(cluster: Cluster, tmp_path: Path) -> None:
    """A forged newest manifest (writing outside the restore dir) is refused; the older one restores."""
    job = Job("job", new_key(), f"file://{tmp_path / 'store'}")
    run_job(cluster.a, cluster.image_a, job)
    wait_for_seq(cluster.a, job.cid, 2)
    destroy_node(cluster.a)
    (tmp_path / "host").mkdir()
    planted = tmp_path / "host" / "planted"
    newest = _forge_newest(job.store, job.key, planted)

    steps_b = cluster.resume_on_b(job)
    rec = registry_record(cluster.b, job.cid)
    assert rec is not None and rec["restored_from"] == newest - 1, rec
    assert not planted.exists() and list((tmp_path / "host").iterdir()) == []
    assert marker_of(cluster.b, job.cid) == job.marker
    cluster.check_memory(job, steps_b)


def test_changed_base_image_starts_fresh_and_says_why(cluster: Cluster, tmp_path: Path, test_images) -> None:
    job = Job("job", new_key(), f"file://{tmp_path / 'store'}")
    run_job(cluster.a, cluster.image_a, job)
    wait_for_seq(cluster.a, job.cid, 1)
    destroy_node(cluster.a)

    busybox = cluster.b.import_image(test_images.busybox)
    events = EventWatcher(cluster.b, tmp_path / "events-b.txt")
    try:
        run_job(cluster.b, busybox, job, command=["sleep", "600"])
        wait_until(lambda: task_status(cluster.b, job.cid) == "RUNNING", 60, "the fresh task on B")
        wait_until(lambda: events.lines("/revenant/restore"), 30, "the /revenant/restore event")
    finally:
        events.stop()
    rec = registry_record(cluster.b, job.cid)
    assert rec is not None and rec["restored_from"] is None and "image" in (rec["fresh_reason"] or ""), rec
    (event,) = events.lines("/revenant/restore")
    assert "fresh" in event and "image" in event, event
    assert "starting fresh" in shim_log(cluster.b)
    assert marker_of(cluster.b, job.cid) is None, "a layer from the other image was applied"


def test_checkpoint_on_stop(cluster: Cluster, tmp_path: Path) -> None:
    """`ctr task kill -s SIGTERM` on a container with checkpoint-on-stop takes a final checkpoint first."""
    job = Job("job", new_key(), f"file://{tmp_path / 'store'}", interval="off", on_stop=True)
    run_job(cluster.a, cluster.image_a, job)
    wait_for_step(job_log(cluster.a, job.cid), 5)
    assert not store_checkpoints(job.store, job.key)
    cluster.a.ctr("task", "kill", "-s", "SIGTERM", job.cid, input="")
    wait_stopped(cluster.a, job.cid)
    (ckpt,) = store_checkpoints(job.store, job.key)
    steps_a = read_steps(job_log(cluster.a, job.cid))
    destroy_node(cluster.a)

    steps_b = cluster.resume_on_b(job)
    rec = registry_record(cluster.b, job.cid)
    assert rec is not None and rec["restored_from"] == ckpt.seq, rec
    assert steps_a[-1].n in {s.n for s in steps_b}
    cluster.check_memory(job, steps_b)


@pytest.mark.parametrize(
    ("annotation", "value", "says"),
    [
        ("revenant.io/checkpoint-interval", "soon", "not a duration"),
        ("revenant.io/keep", "0", "at least 1"),
        ("revenant.io/store", "ftp://somewhere", "not a store URL"),
        ("revenant.io/checkpoint-on-stop", "maybe", "not true or false"),
        ("revenant.io/checkpoint-key", "../escape", "must be"),
    ],
)
def test_bad_annotation_fails_create(
    containerd_node: ContainerdNode, test_images, tmp_path: Path, annotation: str, value: str, says: str
) -> None:
    image = containerd_node.import_image(test_images.busybox)
    job = Job("bad", "test/bad/main", f"file://{tmp_path / 'store'}")
    res = run_job(
        containerd_node,
        image,
        job,
        check=False,
        annotations={**job.annotations(), annotation: value},
        command=["sleep", "600"],
    )
    assert res.returncode != 0
    assert annotation in res.stderr and says in res.stderr, res.stderr
    assert task_status(containerd_node, "bad") == "ABSENT"
