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

# Tests that need no root, containerd, runc, CRIU, dockerd or S3/registry servers (an in-process ttrpc
# server, a local metadata stand-in or a gcc-built fake libcuda is fine): the `unit` marker, which
# `make unit` selects. Everything under tests/unit/ is, and these files; a test added to one of them must
# keep to that, or move.
UNIT_DIRS = ("tests/unit/",)
UNIT_FILES = frozenset(
    {
        "tests/agent/test_cli.py",
        "tests/agent/test_detect.py",
        "tests/agent/test_drain.py",
        "tests/agent/test_registry.py",
        "tests/agent/test_watchers.py",
        "tests/gpu/test_gpu_checkpoint.py",
        "tests/shim/test_units.py",
        "tests/snapshotter/test_filters.py",
        "tests/store/test_cli_progress.py",
        "tests/store/test_fuzz.py",
        "tests/store/test_units.py",
        "tests/ttrpc/test_codec.py",
        "tests/ttrpc/test_codec_fuzz.py",
        "tests/ttrpc/test_descriptors.py",
        "tests/ttrpc/test_server_client.py",
    }
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        try:
            path = item.path.resolve().relative_to(REPO).as_posix()
        except ValueError:
            continue
        if path in UNIT_FILES or path.startswith(UNIT_DIRS):
            item.add_marker(pytest.mark.unit)


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
