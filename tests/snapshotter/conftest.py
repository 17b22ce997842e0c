"""Fixtures for the snapshotter tests: containerd nodes with this tree's revenant-snapshotter attached."""

from __future__ import annotations

import contextlib
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from harness.containerd import ContainerdNode
from harness.layered_image import IMAGE_REF, build_image
from harness.snapshotter_proc import RevenantNode, SnapshotterProcess

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def layered_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two-layer busybox image (ref harness.layered_image.IMAGE_REF) for whiteout/opaque scenarios."""
    return build_image(tmp_path_factory.mktemp("layered") / "layered.tar")


@pytest.fixture
def layered_ref() -> str:
    return IMAGE_REF


@pytest.fixture
def revenant_node_factory(
    node_factory: Callable[..., ContainerdNode], request: pytest.FixtureRequest
) -> Iterator[Callable[..., RevenantNode]]:
    """node_factory plus `revenant-snapshotter --address node.snapshotter_address --root <node dir>/...`."""
    made: list[RevenantNode] = []

    def make(name: str = "node", store: str | None = None) -> RevenantNode:
        node = node_factory(name)
        # The snapshotter's root lives beside the node's dir, not in it: the harness walks the node
        # dir while tearing it down, and snapshot removals running at that moment would race it.
        root = Path(tempfile.mkdtemp(prefix=f"rv-snap-{name}-", dir="/tmp")) / "root"
        snap = SnapshotterProcess(node.snapshotter_address, root, store=store)
        # containerd dials proxy plugins at start-up and backs off after a failed dial: start the
        # snapshotter first, then (re)start containerd, so the first dial finds it.
        rn = RevenantNode(node, snap)
        made.append(rn)  # before start: teardown must kill the snapshotter even if start-up fails
        node.stop()
        snap.start()
        node.start()
        return rn

    yield make
    failed = any(getattr(getattr(request.node, f"rep_{w}", None), "failed", False) for w in ("setup", "call"))
    keep = REPO / "test-logs" / re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.nodeid) if failed else None
    for rn in reversed(made):
        try:
            if keep is not None:
                keep.mkdir(parents=True, exist_ok=True)
                with contextlib.suppress(OSError):  # a test may have destroyed the node already
                    shutil.copy(rn.snapshotter.log_path, keep / f"snapshotter-{rn.node.name}.log")
            # containerd removes containers (and so snapshots) through the snapshotter: keep it up for that.
            rn.node.destroy(keep_logs_in=keep)
        finally:
            rn.snapshotter.kill()
            _remove_snapshotter_dir(rn.snapshotter.root.parent)


def _remove_snapshotter_dir(path: Path) -> None:
    prefix = str(path) + "/"
    with open("/proc/self/mountinfo") as f:
        mounts = [line.split()[4] for line in f if line.split()[4].startswith(prefix)]
    for mp in sorted(mounts, key=len, reverse=True):
        subprocess.run(["umount", "-l", mp], capture_output=True)
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def revenant_node(revenant_node_factory: Callable[..., RevenantNode]) -> RevenantNode:
    return revenant_node_factory("snap")
