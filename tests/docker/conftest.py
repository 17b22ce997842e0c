"""A private containerd node with a private dockerd on it, per module; the test images loaded with
`docker load`. Tests that compare runtimes take `runtime`, parametrized over Docker's default runtime
(runc) and revenant's."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from harness.agent_fixtures import agent_factory, metadata_server  # noqa: F401
from harness.docker import REVENANT_RUNTIME, RUNC_RUNTIME, DockerHost
from harness.images import TestImages

FAILED_LOGS = Path(__file__).resolve().parents[2] / "test-logs"


@pytest.fixture(scope="module")
def docker_host(test_images: TestImages, request: pytest.FixtureRequest) -> Iterator[DockerHost]:
    host = DockerHost("dk", test_images, FAILED_LOGS)
    yield host
    failed = request.session.testsfailed > 0
    host.destroy(FAILED_LOGS / f"docker-{request.module.__name__}" if failed else None)


@pytest.fixture
def docker_host_factory(
    test_images: TestImages, request: pytest.FixtureRequest
) -> Iterator[Callable[[str], DockerHost]]:
    """Fresh hosts for one test (hosts A and B of a move); destroyed at teardown."""
    hosts: list[DockerHost] = []

    def make(name: str) -> DockerHost:
        host = DockerHost(name, test_images, FAILED_LOGS)
        hosts.append(host)
        return host

    yield make
    failed = any(getattr(getattr(request.node, f"rep_{w}", None), "failed", False) for w in ("setup", "call"))
    for host in reversed(hosts):
        host.destroy(FAILED_LOGS / f"docker-{request.node.name}" if failed else None)


@pytest.fixture(params=[RUNC_RUNTIME, REVENANT_RUNTIME], ids=["runc", "revenant"])
def runtime(request: pytest.FixtureRequest) -> str:
    return request.param
