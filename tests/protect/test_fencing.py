"""Fencing through protection: after a partition the old node keeps running its copy of the job; once
another node restores the key, the old copy's checkpoints are refused by the store (owner epochs) and
it stops checkpointing, so the two never interleave under one key.

Real containerd nodes, the revenant shim, CRIU and a file:// store. The two copies run under different
container ids: the same id on two nodes of one machine would share a cgroup (and a freezer).
"""

from __future__ import annotations

import dataclasses
import uuid
from pathlib import Path

import pytest

from harness.memjob import assert_continuous, read_steps, wait_for_step
from harness.protect import (
    Job,
    job_log,
    registry_record,
    run_job,
    store_checkpoints,
    wait_for_seq,
)
from harness.wait import wait_until

pytestmark = pytest.mark.timeout(600)


def test_the_old_owner_is_fenced_once_another_node_restores_the_key(node_factory, test_images, tmp_path: Path) -> None:
    a, b = node_factory("a"), node_factory("b")
    image_a, image_b = a.import_image(test_images.memjob), b.import_image(test_images.memjob)
    job_a = Job("fence-a", f"test/{uuid.uuid4().hex[:10]}/main", f"file://{tmp_path / 'store'}", interval="2s")
    run_job(a, image_a, job_a)
    wait_for_seq(a, job_a.cid, 2)
    epoch_a = store_checkpoints(job_a.store, job_a.key)[-1].epoch
    assert epoch_a, "A's checkpoints carry no owner epoch"

    # The partition: A is never told and runs on. B re-creates the job under the same key.
    job_b = dataclasses.replace(job_a, cid="fence-b")
    run_job(b, image_b, job_b)
    log_b = job_log(b, job_b.cid)
    wait_until(lambda: read_steps(log_b), 120, "the job running on B")
    restored_from = registry_record(b, job_b.cid)["restored_from"]
    assert restored_from is not None

    # A's next periodic checkpoint is refused and A stops checkpointing under the key.
    def a_fenced() -> str | None:
        err = (registry_record(a, job_a.cid) or {}).get("last_error") or ""
        return err if "Fenced" in err else None

    err = wait_until(a_fenced, 120, "A's checkpoint to be refused as fenced")
    assert "is fenced" in err, err
    wait_for_seq(b, job_b.cid, restored_from + 1)  # B checkpoints on under the key
    wait_for_step(job_log(a, job_a.cid), read_steps(job_log(a, job_a.cid))[-1].n + 3)  # A's job still runs

    infos = store_checkpoints(job_a.store, job_a.key)
    epoch_b = max(i.epoch for i in infos)
    assert epoch_b > epoch_a
    after = [i for i in infos if i.seq > restored_from]
    assert after and all(i.epoch == epoch_b for i in after), [(i.seq, i.epoch) for i in infos]
    assert_continuous(read_steps(log_b))
