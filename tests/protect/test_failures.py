"""No failure loses the job (docs/security.md, "Failures at Create and at the final checkpoint"):
a store outage at Create fails Create instead of starting the job fresh, and a final checkpoint that
cannot be stored leaves the job running. Real nodes, the shim, CRIU and SeaweedFS stopped for real."""

from __future__ import annotations

import uuid
from dataclasses import replace

import pytest

from harness.memjob import assert_continuous, read_steps, wait_for_step
from harness.protect import (
    Job,
    destroy_node,
    job_log,
    registry_record,
    run_job,
    store_checkpoints,
    task_status,
    wait_for_seq,
    wait_stopped,
)

from .test_protect import Cluster, cluster  # noqa: F401  (the two-node fixture)

pytestmark = pytest.mark.timeout(900)


def new_key() -> str:
    return f"test/{uuid.uuid4().hex[:10]}/main"


def test_store_outage_at_create_fails_create_then_restores(s3_server, cluster: Cluster) -> None:  # noqa: F811
    job = Job("job", new_key(), s3_server.url, interval="3s")
    run_job(cluster.a, cluster.image_a, job)
    wait_for_seq(cluster.a, job.cid, 1, timeout=180)
    destroy_node(cluster.a)
    seqs = [c.seq for c in store_checkpoints(job.store, job.key)]

    s3_server.stop()
    try:
        res = run_job(cluster.b, cluster.image_b, job, check=False)
        assert res.returncode != 0, "Create started the job although its checkpoints could not be read"
        assert "not starting fresh" in res.stderr and job.key in res.stderr, res.stderr
        assert "unavailable" in res.stderr.lower(), res.stderr
        assert task_status(cluster.b, job.cid) == "ABSENT"
        assert registry_record(cluster.b, job.cid) is None
    finally:
        s3_server.start()
    cluster.b.ctr("containers", "rm", job.cid, input="")
    # What the orchestrator's retry does once the store is back: the pre-outage checkpoint restores.
    steps_b = cluster.resume_on_b(job)
    rec = registry_record(cluster.b, job.cid)
    assert rec is not None and rec["restored_from"] == max(seqs), rec
    assert steps_b[0].n == 1 and steps_b[-1].n > 3, "the job started fresh"
    assert_continuous(steps_b)
    cluster.check_memory(job, steps_b)


def test_final_checkpoint_with_the_store_down_leaves_the_job_running(s3_server, cluster: Cluster) -> None:  # noqa: F811
    job = Job("job", new_key(), s3_server.url, interval="3s", on_stop=True)
    run_job(cluster.a, cluster.image_a, job)
    wait_for_seq(cluster.a, job.cid, 1, timeout=180)
    log_a = job_log(cluster.a, job.cid)

    s3_server.stop()
    try:
        res = cluster.a.ctr("task", "kill", "-s", "SIGTERM", job.cid, input="", check=False, timeout=300)
        assert res.returncode != 0, "the stop went through without a final checkpoint"
        assert "keeps running" in res.stderr and "final checkpoint failed" in res.stderr, res.stderr
        assert task_status(cluster.a, job.cid) == "RUNNING"
        wait_for_step(log_a, read_steps(log_a)[-1].n + 3)  # thawed: it runs on
        rec = registry_record(cluster.a, job.cid)
        assert rec is not None and "stop signal" in (rec["last_error"] or ""), rec
    finally:
        s3_server.start()

    # The stop retried once the store is back: the final checkpoint commits, then the task stops.
    cluster.a.ctr("task", "kill", "-s", "SIGTERM", job.cid, input="", timeout=300)
    wait_stopped(cluster.a, job.cid)
    final = max(c.seq for c in store_checkpoints(job.store, job.key))
    steps_a = read_steps(log_a)
    destroy_node(cluster.a)

    # Without checkpoint-on-stop on B: the node's teardown kill must not wait for another checkpoint.
    steps_b = cluster.resume_on_b(replace(job, on_stop=False))
    rec = registry_record(cluster.b, job.cid)
    assert rec is not None and rec["restored_from"] == final, rec
    assert steps_a[-1].n in {s.n for s in steps_b}, "steps after the final checkpoint were lost"
    assert_continuous(steps_b)
    cluster.check_memory(job, steps_b)
