"""Replicas end to end: a protected job's checkpoints reach the replica store in the background of its
shim, then node A and the primary store (SeaweedFS) are both lost and node B resumes the job from the
replica (the store's `failover = true`), lazily: the replica serves its pages. Real containerd nodes,
shims, CRIU and servers; the memory checksum proves the restored process is the checkpointed one."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from harness.containerd import ContainerdNode
from harness.memjob import assert_continuous, expected_checksum, read_steps, wait_for_step
from harness.protect import Job, destroy_node, job_log, registry_record, run_job, shim_log, wait_for_seq
from harness.wait import wait_until
from shim.store import open_store

pytestmark = pytest.mark.timeout(900)


def _config(node: ContainerdNode, primary: str, replica: str, top: str = "") -> str:
    """The node config with one store and its replica; `top` adds top-level settings."""
    return (
        f'{top}min_checkpoint_interval = "1s"\nscratch_dir = "{node.revenant_scratch}"\ndefault_store = "team"\n'
        f'[stores.team]\nurl = "{primary}"\nreplicas = ["{replica}"]\nfailover = true\n'
    )


def test_job_resumes_from_the_replica_when_node_and_primary_are_lost(
    s3_server, node_factory: Callable[..., ContainerdNode], test_images, tmp_path: Path
) -> None:
    primary, replica = s3_server.url, f"file://{tmp_path / 'replica'}"
    a, b = node_factory("a"), node_factory("b")
    a.write_revenant_config(_config(a, primary, replica))
    # B restores lazily: the copies choose the replica, whose reader then serves the job's pages.
    b.write_revenant_config(_config(b, primary, replica, top="lazy_restore = true\n"))
    image_a, image_b = a.import_image(test_images.memjob), b.import_image(test_images.memjob)
    job = Job("job", f"test/{uuid.uuid4().hex[:10]}/main", "team", marker=f"marker-{uuid.uuid4().hex[:8]}")
    run_job(a, image_a, job)
    wait_for_seq(a, job.cid, 2)

    def replicated() -> int:
        with open_store(replica) as r:
            return max(r._committed(job.key), default=0)

    wait_until(lambda: replicated() >= 2, 120, "a checkpoint on the replica")
    destroy_node(a)
    s3_server.stop()  # the primary's region is gone too
    on_replica = replicated()
    with open_store(replica) as r:
        assert r.verify(job.key) == []

    run_job(b, image_b, job)
    log_b = job_log(b, job.cid)
    wait_until(lambda: read_steps(log_b), 180, f"{job.cid} running on B")
    steps = wait_for_step(log_b, read_steps(log_b)[-1].n + 3, 120)
    assert_continuous(steps)
    assert steps[0].n == 1, "B's log should be A's log carried over, then continued"
    assert "its memory lazily" in shim_log(b), "node B did not restore lazily"
    wait_until(lambda: "lazy restore from" in shim_log(b), 300, "the lazy restore's end")
    assert "complete" in shim_log(b).split("lazy restore from", 1)[1].splitlines()[0]
    rec = registry_record(b, job.cid)
    assert rec is not None and rec["restored_from"] == on_replica, rec
    last = steps[-1]
    assert last.checksum == expected_checksum(test_images.memjob_binary, job.mib, job.seed, last.n)
