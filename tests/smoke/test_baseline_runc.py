"""Baseline: the harness moves a live memjob between two containerd nodes with the STOCK runc shim.

This is the reference revenant is measured against: `ctr container checkpoint --task --rw` on node A,
the checkpoint image exported, node A destroyed, the image imported on node B and
`ctr containers restore --live --rw` there; the job must go on from its step with its memory intact.
"""

from __future__ import annotations

from harness.memjob import (
    LOG_IN_CONTAINER,
    assert_continuous,
    expected_checksum,
    memjob_args,
    read_steps,
    wait_for_step,
)
from harness.wait import wait_until

MIB, SEED = 64, 42
CHECKPOINT_REF = "localhost/revenant/checkpoint:baseline"


def test_live_memjob_moves_between_nodes_with_runc_shim(node_factory, test_images, tmp_path):
    node_a, node_b = node_factory("a"), node_factory("b")
    image = node_a.import_image(test_images.memjob)
    node_a.ctr("run", "-d", "--runc-root", str(node_a.runc_root), image, "job", *memjob_args(MIB, SEED))
    log_a = node_a.rootfs("job") / LOG_IN_CONTAINER.lstrip("/")
    wait_for_step(log_a, 3)

    node_a.ctr("containers", "checkpoint", "--task", "--rw", "job", CHECKPOINT_REF, timeout=300)
    archive = tmp_path / "checkpoint.tar"
    node_a.ctr("images", "export", "--skip-manifest-json", str(archive), CHECKPOINT_REF, timeout=300)
    node_a.destroy()  # node A is gone: its containerd, shims, containers and files

    node_b.import_image(test_images.memjob)
    node_b.import_image(archive, "--no-unpack")
    node_b.ctr("containers", "restore", "--live", "--rw", "job", CHECKPOINT_REF, timeout=300)
    log_b = node_b.rootfs("job") / LOG_IN_CONTAINER.lstrip("/")

    restored = read_steps(log_b)
    assert restored, "the writable layer did not bring the job's log file along"
    checkpoint_step = restored[-1].n
    steps = wait_for_step(log_b, checkpoint_step + 3)
    assert_continuous(steps)
    after = [s for s in steps if s.n > checkpoint_step]
    for step in (after[0], after[-1]):
        assert step.checksum == expected_checksum(test_images.memjob_binary, MIB, SEED, step.n), (
            f"memory differs from the reference at step {step.n}"
        )

    # The job itself re-derives every page from its version counters.
    node_b.ctr("tasks", "kill", "-s", "SIGUSR1", "job")
    wait_until(lambda: "verify=ok" in log_b.read_text(), 60, "memjob verify=ok after SIGUSR1")
    assert "verify=FAIL" not in log_b.read_text()
