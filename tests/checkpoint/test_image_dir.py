"""Checkpoints into a directory (the `ctr task checkpoint --exit --image-path DIR` request), tasks
created from one, bad checkpoints, and checkpoints of paused, exited and concurrently checkpointed tasks.

containerd 1.6's tools cannot do either half for a runtime other than its own runc ones (see
shim_direct.py): `ctr task checkpoint` fills CheckpointOptions{exit, image_path} only when the
container's runtime is io.containerd.runc.v1/v2 and otherwise silently makes a checkpoint image and
leaves the task running; containerd reads a restore directory (Options.criu_image_path) likewise only
for runc runtimes, and ctr has no flag for it. So these tests send exactly the requests containerd
would send - Task/Checkpoint with those CheckpointOptions, Task/Create with `checkpoint=DIR` - to the
shim's own ttrpc socket with shim.ttrpc.Client. Tasks are created through the shim of a long-running
"ck-keeper" container on the same node.
"""

from __future__ import annotations

import shutil
import signal
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from harness.wait import wait_until
from shim.ttrpc import TtrpcError

from .shim_direct import Shim, bundle_for, clone_snapshot, remove_bundle, snapshot_mounts
from .util import (
    REVENANT,
    assert_continuous,
    ctr,
    expected_checksum,
    last_step,
    processes_in_rootfs,
    read_steps,
    run_memjob,
    task_status,
    wait_for_step,
)

MIB, SEED = 64, 23
PAUSED, STOPPED = 4, 3


@pytest.fixture
def node(node_factory, test_images):
    n = node_factory("a")
    n.memjob_image = n.import_image(test_images.memjob)
    ctr(n, "run", "-d", "--runtime", REVENANT, n.memjob_image, "ck-keeper", "sleep", "100000")
    return n


def resume_from(
    node,
    shim: Shim,
    cid: str,
    source: str | dict,
    image_dir: Path,
    memjob_binary: Path,
    checkpointed_at: int,
    rootfs=None,
    while_running: Callable[[], None] | None = None,
) -> None:
    """Create `cid` from `image_dir` on the shim, start it and prove it continues from the checkpoint.
    `source`: the container whose spec (and snapshot, unless `rootfs`) to use, or a spec."""
    bundle = bundle_for(node, cid, source)
    shim.create_from_checkpoint(cid, bundle, rootfs or snapshot_mounts(node, source), image_dir)
    shim.start(cid)
    log = bundle / "rootfs/var/log/memjob.log"
    steps = wait_for_step(log, checkpointed_at + 3, timeout=120)
    assert_continuous(steps)
    assert steps[0].n <= 1
    assert steps[-1].checksum == expected_checksum(memjob_binary, MIB, SEED, steps[-1].n)
    shim.kill(cid, signal.SIGUSR1)
    verdict = wait_until(
        lambda: next((ln for ln in log.read_text().splitlines() if ln.startswith("verify=")), None), 60, "verify line"
    )
    assert str(verdict).startswith("verify=ok"), verdict
    if while_running is not None:
        while_running()
    shim.remove(cid)
    remove_bundle(bundle)


def test_task_checkpoint_exit_image_path_then_create_from_it(node, test_images, tmp_path):
    """CheckpointOptions{exit, image_path=DIR}: the task stops, DIR holds CRIU's images; a task
    created from DIR (Task/Create checkpoint=DIR) runs on from there."""
    images, at = _checkpointed_and_stopped(node, tmp_path)
    assert (images / "inventory.img").is_file()
    resume_from(node, Shim(node, "ck-keeper"), "ck-restored", "ck-job", images, test_images.memjob_binary, at)


def _checkpointed_and_stopped(node, tmp_path) -> tuple[Path, int]:
    log = run_memjob(node, node.memjob_image, "ck-job", MIB, SEED)
    images = tmp_path / "images"
    Shim(node, "ck-job").checkpoint("ck-job", images, exit=True)  # what `ctr task checkpoint --exit --image-path` means
    wait_until(lambda: task_status(node, "ck-job") == "STOPPED", 30, "job stopped after an exit checkpoint")
    ctr(node, "task", "rm", "ck-job")
    return images, last_step(log)


def _assert_nothing_left(node, cid: str, mounts_before: list[str]) -> None:
    assert node.mounts() == mounts_before, "a mount was left behind"
    assert cid not in node.runc_containers(), "runc state was left behind"
    assert sorted(processes_in_rootfs(node)) == sorted(node.keeper_pids)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "other-container"])
def test_bad_checkpoint_fails_clearly_and_leaves_nothing(node, test_images, tmp_path, damage):
    images, _ = _checkpointed_and_stopped(node, tmp_path)
    rootfs = snapshot_mounts(node, "ck-job")
    spec_of = "ck-job"
    if damage == "truncated":
        pages = max((images).glob("pages-*.img"), key=lambda p: p.stat().st_size)
        with open(pages, "r+b") as f:
            f.truncate(pages.stat().st_size // 2)
    elif damage == "garbage":
        shutil.rmtree(images)
        images.mkdir()
        (images / "inventory.img").write_bytes(b"not a CRIU image" * 64)
        (images / "core-1.img").write_bytes(bytes(range(256)) * 16)
    else:  # the keeper's rootfs and spec: a different container, without the dumped process's files
        rootfs, spec_of = clone_snapshot(node, "ck-keeper", "ck-other"), "ck-keeper"
    node.keeper_pids = processes_in_rootfs(node)
    mounts_before = node.mounts()
    shim = Shim(node, "ck-keeper")
    bundle = bundle_for(node, "ck-bad", spec_of)
    with pytest.raises(TtrpcError) as failure:
        shim.create_from_checkpoint("ck-bad", bundle, rootfs, images)
        shim.start("ck-bad")
    message = str(failure.value)
    assert any(clear in message for clear in ("restore of ck-bad failed", "is truncated", "not a CRIU")), message
    # The shim cleaned its side at once: no rootfs mount, no runc container, no process.
    _assert_nothing_left(node, "ck-bad", mounts_before)
    # A task left CREATED by the failed Start goes with Delete, leaving nothing either.
    try:
        shim.remove("ck-bad")
    except TtrpcError as e:
        assert e.code == 5, e  # NotFound: Create itself failed and kept nothing
    _assert_nothing_left(node, "ck-bad", mounts_before)
    assert shim.status("ck-keeper") == 2  # the shim serves on


def test_ctr_restore_of_a_non_checkpoint_image_fails_cleanly(node):
    res = ctr(node, "containers", "restore", "--live", "--rw", "ck-nope", node.memjob_image, check=False)
    assert res.returncode != 0 and res.stderr.strip(), res
    assert "ck-nope" not in ctr(node, "containers", "ls", "-q").stdout.split()
    assert "ck-nope" not in ctr(node, "task", "ls", "-q").stdout.split()


def test_paused_task_two_checkpoints_at_once(node, test_images, tmp_path):
    """A paused task is checkpointed twice at the same time: both succeed (serialized by the shim),
    the task stays paused throughout, and each image restores into a job that runs on."""
    log = run_memjob(node, node.memjob_image, "ck-job", MIB, SEED)
    ctr(node, "task", "pause", "ck-job")
    at = last_step(log)
    shim = Shim(node, "ck-job")
    dirs = [tmp_path / "one", tmp_path / "two"]
    errors: list[BaseException] = []

    def take(d: Path) -> None:
        try:
            shim.checkpoint("ck-job", d)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=take, args=(d,)) for d in dirs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    assert shim.status("ck-job") == PAUSED
    assert task_status(node, "ck-job") == "PAUSED"
    assert last_step(log) == at, "a paused task ran during its checkpoint"
    copies = [clone_snapshot(node, "ck-job", f"ck-copy{i}") for i in range(2)]  # the rw layer as dumped
    ctr(node, "task", "resume", "ck-job")
    wait_for_step(log, at + 2)
    keeper = Shim(node, "ck-keeper")
    for i, (d, rootfs) in enumerate(zip(dirs, copies, strict=True)):
        resume_from(node, keeper, f"ck-restored{i}", "ck-job", d, test_images.memjob_binary, at, rootfs=rootfs)
    assert_continuous(read_steps(log))


def test_checkpoint_of_an_exited_task_is_refused(node, tmp_path):
    ctr(node, "run", "-d", "--runtime", REVENANT, node.memjob_image, "ck-short", "true")
    wait_until(lambda: task_status(node, "ck-short") == "STOPPED", 30, "the task exited")
    shim = Shim(node, "ck-short")
    with pytest.raises(TtrpcError) as refused:
        shim.checkpoint("ck-short", tmp_path / "never")
    assert refused.value.code == 9, refused.value  # FailedPrecondition
    assert (
        ctr(node, "task", "checkpoint", "--image-path", str(tmp_path / "never"), "ck-short", check=False).returncode
        != 0
    )
    assert not (tmp_path / "never" / "inventory.img").exists()
