"""Shared fixtures: private containerd nodes and locally built test images."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from harness.containerd import ContainerdNode
from harness.images import TestImages, build_test_images

REPO = Path(__file__).resolve().parent.parent
FAILED_LOGS = REPO / "test-logs"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> pytest.TestReport:
    # Fixtures read the outcome to keep a failed test's server logs.
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


def _failed(request: pytest.FixtureRequest) -> bool:
    return any(getattr(getattr(request.node, f"rep_{w}", None), "failed", False) for w in ("setup", "call"))


def _log_dir(request: pytest.FixtureRequest) -> Path:
    return FAILED_LOGS / re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.nodeid)


@pytest.fixture(scope="session")
def test_images(tmp_path_factory: pytest.TempPathFactory) -> TestImages:
    return build_test_images(tmp_path_factory.mktemp("images"))


@pytest.fixture
def node_factory(request: pytest.FixtureRequest) -> Iterator[Callable[..., ContainerdNode]]:
    """Start private containerd nodes on demand: node_factory("a"), node_factory("b")."""
    nodes: list[ContainerdNode] = []

    def make(name: str = "node", extra_config: str = "") -> ContainerdNode:
        node = ContainerdNode(name, extra_config)
        nodes.append(node)
        node.start()
        return node

    yield make
    keep = _log_dir(request) if _failed(request) else None
    for node in reversed(nodes):
        node.destroy(keep_logs_in=keep)


@pytest.fixture
def containerd_node(node_factory: Callable[..., ContainerdNode]) -> ContainerdNode:
    return node_factory("node")
