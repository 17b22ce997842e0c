"""revenant runs one shim per container (CRI pods: one per sandbox) by default, or with
REVENANT_SHIM_SHARED=1 one per containerd namespace that lingers after its last task; these tests pin
both lifecycles down."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from harness.containerd import ContainerdNode
from harness.wait import wait_until

from .conftest import REVENANT_SHIM
from .helpers import task_status


def revenant_shims(node: ContainerdNode) -> list[int]:
    pids = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if node.address.encode() in argv and any(b"containerd-shim-revenant-v1" in a for a in argv[:2]):
            pids.append(int(pid))
    return pids


@pytest.fixture(params=["shared", "per-container"])
def node(request: pytest.FixtureRequest, test_images) -> Iterator[ContainerdNode]:
    node = ContainerdNode("share")
    node.env["REVENANT_SHIM_LINGER"] = "1"
    if request.param == "shared":
        node.env["REVENANT_SHIM_SHARED"] = "1"
    try:
        node.start()
        node.image = node.import_image(test_images.busybox)  # type: ignore[attr-defined]
        yield node
    finally:
        node.destroy()


def test_shim_lifecycle(node: ContainerdNode):
    shared = node.env.get("REVENANT_SHIM_SHARED") == "1"
    for cid in ("one", "two"):
        node.ctr("run", "-d", "--runtime", REVENANT_SHIM, node.image, cid, "sleep", "1000", input="")
    shims = revenant_shims(node)
    assert len(shims) == (1 if shared else 2)
    assert {int((node.bundle(c) / "shim.pid").read_text()) for c in ("one", "two")} == set(shims)
    res = node.ctr("task", "exec", "--exec-id", "e", "two", "sh", "-c", "echo from-two", input="")
    assert res.stdout.strip() == "from-two"

    node.ctr("task", "kill", "-s", "SIGKILL", "one")
    wait_until(lambda: task_status(node, "one") == "STOPPED", 30, "one STOPPED")
    assert task_status(node, "two") == "RUNNING"  # a task's exit touches no other task of the shim
    node.ctr("task", "rm", "one")
    assert task_status(node, "two") == "RUNNING"

    node.ctr("task", "kill", "-s", "SIGKILL", "two")
    wait_until(lambda: task_status(node, "two") == "STOPPED", 30, "two STOPPED")
    node.ctr("task", "rm", "two")
    if shared:  # the shim waits for the next container for REVENANT_SHIM_LINGER seconds ...
        res = node.ctr("run", "--rm", "--runtime", REVENANT_SHIM, node.image, "three", "echo", "reused", input="")
        assert res.stdout.strip() == "reused"
    # ... and then exits, releasing its socket
    wait_until(lambda: not revenant_shims(node), 30, "no revenant shim left")


def test_cri_sandbox_groups_share_a_shim(test_images):
    """Containers annotated with one io.kubernetes.cri.sandbox-id share their sandbox's shim, also with
    one shim per container otherwise (as containerd's runc shim groups a pod)."""
    node = ContainerdNode("pod")
    node.env["REVENANT_SHIM_LINGER"] = "1"
    try:
        node.start()
        image = node.import_image(test_images.busybox)
        for cid, pod in (("pause", "pod-a"), ("app", "pod-a"), ("other", "pod-b")):
            node.ctr(
                "run",
                "-d",
                "--runtime",
                REVENANT_SHIM,
                "--annotation",
                f"io.kubernetes.cri.sandbox-id={pod}",
                image,
                cid,
                "sleep",
                "1000",
                input="",
            )
        assert len(revenant_shims(node)) == 2
        addresses = {cid: (node.bundle(cid) / "address").read_text() for cid in ("pause", "app", "other")}
        assert addresses["pause"] == addresses["app"] != addresses["other"]
        res = node.ctr("task", "exec", "--exec-id", "e", "app", "echo", "in-pod", input="")
        assert res.stdout.strip() == "in-pod"
    finally:
        node.destroy()


def test_killing_a_shared_shim_cleans_up_every_task_it_served(test_images):
    """The price of sharing: all tasks of the shim go, and containerd's `delete` leaves nothing behind."""
    node = ContainerdNode("crash")
    node.env["REVENANT_SHIM_SHARED"] = "1"
    try:
        node.start()
        image = node.import_image(test_images.busybox)
        for cid in ("a", "b"):
            node.ctr("run", "-d", "--runtime", REVENANT_SHIM, image, cid, "sleep", "1000", input="")
        [shim] = revenant_shims(node)
        task_pids = [int(node.ctr("task", "ls").stdout.split(cid)[1].split()[0]) for cid in ("a", "b")]
        os.kill(shim, 9)
        wait_until(lambda: node.ctr("task", "ls", "-q").stdout.split() == [], 60, "both tasks removed")
        wait_until(lambda: not any(os.path.exists(f"/proc/{p}") for p in task_pids), 30, "processes gone")
        assert list(node.runc_containers()) == []
        assert [m for m in node.mounts() if "/rootfs" in m] == []
        res = node.ctr("run", "--rm", "--runtime", REVENANT_SHIM, image, "after", "echo", "fresh-shim", input="")
        assert res.stdout.strip() == "fresh-shim"  # the dead shim's socket is replaced
    finally:
        node.destroy()
