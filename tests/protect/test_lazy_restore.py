"""Lazy restore end to end (node config `lazy_restore = true`): a protected memjob checkpointed on node A
resumes on node B while its memory is still in the store; CRIU's lazy-pages daemon faults every page in
from the shim's page server, which reads it through the store's verifying reader. memjob's checksum
(recomputed on the host) proves every page came back; a damaged chunk among the lazy pages kills the job
instead of letting it run on with pages it did not get."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from harness.memjob import assert_continuous, read_steps, wait_for_step
from harness.protect import Job, destroy_node, job_log, run_job, shim_log, task_status, wait_for_seq
from harness.store_util import corrupt_chunk, newest_and_older_chunks
from harness.wait import wait_until

from .test_protect import Cluster, cluster, new_key, store_url  # noqa: F401  (fixtures)

pytestmark = pytest.mark.timeout(900)


def _lazy_nodes(cluster: Cluster) -> None:  # noqa: F811  (the fixture's name)
    cluster.b.write_revenant_config(extra="lazy_restore = true")


def _scratch_entries(cluster: Cluster) -> list[str]:  # noqa: F811
    scratch = cluster.b.revenant_scratch
    return sorted(p.name for p in scratch.iterdir()) if scratch.exists() else []


def test_lazy_restore_brings_back_every_page(store_url: str, cluster: Cluster) -> None:  # noqa: F811
    _lazy_nodes(cluster)
    job = Job("job", new_key(), store_url, mib=256, interval="3s", interval_ms=200)
    run_job(cluster.a, cluster.image_a, job)
    wait_for_seq(cluster.a, job.cid, 2)
    destroy_node(cluster.a)

    steps_b = cluster.resume_on_b(job, timeout=300)
    assert_continuous(steps_b)
    cluster.check_memory(job, steps_b)
    log = shim_log(cluster.b)
    assert "its memory lazily" in log, "node B did not restore lazily"
    wait_until(lambda: "lazy restore from" in shim_log(cluster.b), 300, "the lazy restore's end")
    log = shim_log(cluster.b)
    ended = log.split("lazy restore from", 1)[1].splitlines()[0]
    assert "complete" in ended, log[-4000:]
    # The background fill ran (started once the job ran), beside the pages the job's faults fetched.
    by_fill = re.search(r"'claimed_by_fill': (\d+)", ended)
    assert by_fill and int(by_fill[1]) > 0, ended
    # The reader, its store and the scratch copy of the images go once the last page arrived.
    wait_until(lambda: _scratch_entries(cluster) == [], 60, "the restore scratch removed")
    # The job keeps running on its own memory after the daemon is gone.
    n = read_steps(job_log(cluster.b, job.cid))[-1].n
    wait_until(lambda: read_steps(job_log(cluster.b, job.cid))[-1].n >= n + 3, 120, "steps after the transfer")
    cluster.check_memory(job, read_steps(job_log(cluster.b, job.cid)))


def test_lazy_restore_of_a_process_tree(cluster: Cluster, tmp_path: Path) -> None:  # noqa: F811
    """A shell that waits for memjob: two tasks, each with its own pagemap and lazy pages."""
    _lazy_nodes(cluster)
    job = Job("job", new_key(), f"file://{tmp_path / 'store'}", mib=128, interval="3s", interval_ms=200)
    tree = ["sh", "-c", job.command()[-1].replace("exec ", "") + " & wait"]
    run_job(cluster.a, cluster.image_a, job, command=tree)
    wait_for_seq(cluster.a, job.cid, 2)
    destroy_node(cluster.a)

    run_job(cluster.b, cluster.image_b, job, command=tree)
    log_b = job_log(cluster.b, job.cid)
    wait_until(lambda: read_steps(log_b), 300, f"{job.cid} running on B")
    steps_b = wait_for_step(log_b, read_steps(log_b)[-1].n + 3, 300)
    assert_continuous(steps_b)
    cluster.check_memory(job, steps_b)
    wait_until(lambda: "lazy restore from" in shim_log(cluster.b), 300, "the lazy restore's end")
    log = shim_log(cluster.b)
    assert "its memory lazily" in log and "complete" in log.split("lazy restore from", 1)[1].splitlines()[0]
    pids = cluster.b.ctr("task", "ps", job.cid, input="").stdout.split()[2:]
    assert len(pids) >= 4, f"expected the shell and memjob running on B: {pids}"  # PID INFO header + 2 rows


def _damage_a_lazy_chunk(url: str, key: str) -> str:
    """Flip a byte in a chunk only the newest checkpoint's page image references, and only in its second half
    (among the job's anonymous memory, which restores lazily: a chunk of new pages also holding pages of the
    first half would fail the restore's eager part instead); returns its digest."""
    from shim.store import open_store

    store = open_store(url)
    try:
        _newest, m, older = newest_and_older_chunks(store, key)
        (pages,) = [e for e in m.entries if e["path"].startswith("criu/pages-")]
        eager = {ref[2] for ref in pages["chunks"] if ref[0] < pages["size"] // 2}
        own = [ref for ref in pages["chunks"] if ref[2] not in older | eager and ref[0] >= pages["size"] // 2]
        assert own, "the newest checkpoint's page image shares every chunk of its second half"
        digest = own[len(own) // 2][2]
        corrupt_chunk(store, None, digest)
    finally:
        store.close()
    return digest


def test_a_damaged_lazy_page_kills_the_job(cluster: Cluster, tmp_path: Path) -> None:  # noqa: F811
    _lazy_nodes(cluster)
    job = Job("job", new_key(), f"file://{tmp_path / 'store'}", mib=256, interval="3s", interval_ms=200)
    run_job(cluster.a, cluster.image_a, job)
    wait_for_seq(cluster.a, job.cid, 2)
    destroy_node(cluster.a)
    digest = _damage_a_lazy_chunk(job.store, job.key)

    run_job(cluster.b, cluster.image_b, job)
    wait_until(lambda: "lazy restore from" in shim_log(cluster.b), 300, "the lazy restore's end")
    log = shim_log(cluster.b)
    assert "its memory lazily" in log, "node B did not restore lazily"
    assert "failed" in log.split("lazy restore from", 1)[1].splitlines()[0], log[-4000:]
    assert digest in log, "the failure does not name the damaged chunk"
    if f"restore of {job.key} seq 2 failed, falling back" in log:
        # The job (or CRIU) asked for the damaged page before the restore was over: the restore failed
        # and left nothing behind, so node B restored the checkpoint before it, which runs on.
        assert f"will restore from {job.key} seq 1" in log, log[-4000:]
        log_b = job_log(cluster.b, job.cid)
        wait_until(lambda: read_steps(log_b), 300, f"{job.cid} running on B from seq 1")
        steps = wait_for_step(log_b, read_steps(log_b)[-1].n + 2, 300)
        assert_continuous(steps)
        cluster.check_memory(job, steps)
        return
    wait_until(lambda: task_status(cluster.b, job.cid) in ("STOPPED", "ABSENT"), 120, "the job killed")
    # Whatever it printed before the bad page was asked for was computed on pages it really got.
    steps = read_steps(job_log(cluster.b, job.cid))
    if steps:
        cluster.check_memory(job, steps)
