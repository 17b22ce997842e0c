"""Fixtures for the Kubernetes tests: CRI-enabled harness nodes of containerd 1.6 and 1.7 with the local
pause, busybox and memjob images in CRI's namespace, and a CRI client per node."""

from __future__ import annotations

import itertools
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from harness.agent_fixtures import agent_factory, metadata_server  # noqa: E402, F401
from harness.containerd import CRI_NAMESPACE, ContainerdNode  # noqa: E402
from harness.cri import CriClient  # noqa: E402
from harness.images import TestImages, build_pause_image  # noqa: E402
from tests.harness.servers import _registry  # noqa: E402, F401

VERSIONS = ("1.6", "1.7")
# A directory to keep each node's containerd log (with the shim's) in when the node goes: for debugging.
KEEP_LOGS = Path(os.environ["REVENANT_KEEP_LOGS"]) if os.environ.get("REVENANT_KEEP_LOGS") else None
_subnets = itertools.count(16)


class CriNode:
    """A harness node with CRI on, its images imported into k8s.io, and a client to its CRI."""

    def __init__(self, node: ContainerdNode, images: TestImages, pause: Path) -> None:
        self.node = node
        for archive in (pause, images.busybox, images.memjob):
            node.ctr("images", "import", str(archive), namespace=CRI_NAMESPACE, timeout=300)
        self.cri = CriClient(node.cri_address)
        self.logs = node.dir / "pod-logs"

    def rootfs(self, cid: str) -> Path:
        return self.node.bundle(cid, CRI_NAMESPACE) / "rootfs"

    def close(self) -> None:
        self.cri.close()


def new_cri_node(
    name: str, version: str, images: TestImages, pause: Path, tmp: Path, extra_config: str = ""
) -> CriNode:
    """Pod subnets come from 10.231.0.0/16 (no gateway, no masquerade: nothing leaves the host)."""
    subnet = f"10.231.{next(_subnets) % 240 + 16}.0/24"
    node = ContainerdNode(name, extra_config, cri=True, version=version, subnet=subnet)
    # Protected pods without a store annotation go to a store of the test's own, never /var/lib/revenant.
    node.write_revenant_config(extra=f'store = "file://{tmp / "node-store"}"')
    node.start()
    try:
        return CriNode(node, images, pause)
    except BaseException:
        node.destroy()
        raise


@pytest.fixture(scope="session")
def pause_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_pause_image(tmp_path_factory.mktemp("pause"))


@pytest.fixture(scope="module", params=VERSIONS)
def cri_node(request, test_images, pause_image, tmp_path_factory) -> Iterator[CriNode]:
    """One node per containerd version, shared by a module's tests (each removes its pods)."""
    node = new_cri_node("k", request.param, test_images, pause_image, tmp_path_factory.mktemp("cri"))
    yield node
    node.close()
    node.node.destroy(keep_logs_in=KEEP_LOGS)


@pytest.fixture
def cri_node_factory(test_images, pause_image, tmp_path: Path) -> Iterator[Callable[..., CriNode]]:
    nodes: list[CriNode] = []

    def make(name: str, version: str, extra_config: str = "") -> CriNode:
        n = new_cri_node(name, version, test_images, pause_image, tmp_path, extra_config)
        nodes.append(n)
        return n

    yield make
    for n in reversed(nodes):
        n.close()
        n.node.destroy(keep_logs_in=KEEP_LOGS)
