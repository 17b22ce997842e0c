"""A private containerd node with a private dockerd on it, per module; the test images loaded with
`docker load`. Tests that compare runtimes take `runtime`, parametrized over Docker's default runtime
(runc) and revenant's."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from harness.containerd import ContainerdNode
from harness.docker import REVENANT_RUNTIME, RUNC_RUNTIME, DockerDaemon
from harness.images import TestImages
from harness.metadata_server import MetadataServer
from harness.protect import AgentProcess

FAILED_LOGS = Path(__file__).resolve().parents[2] / "test-logs"


class DockerHost:
    """A node and its dockerd, with the test images loaded: one "host" a Docker user has."""

    def __init__(self, name: str, images: TestImages) -> None:
        self.node = ContainerdNode(name)
        self.node.start()
        self.docker_daemon = DockerDaemon(self.node, f"{name}-docker")
        try:
            self.docker_daemon.start()
            self.busybox = self.docker_daemon.load(images.busybox)
            self.memjob = self.docker_daemon.load(images.memjob)
        except BaseException:
            self.destroy(FAILED_LOGS / f"docker-host-{name}")
            raise

    def docker(self, *args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
        return self.docker_daemon.docker(*args, **kw)

    def inspect_restarts(self, container: str) -> int:
        return int(self.docker("inspect", "-f", "{{.RestartCount}}", container).stdout.strip())

    def destroy(self, keep_logs_in: Path | None = None) -> None:
        self.docker_daemon.destroy(keep_logs_in)
        self.node.destroy(keep_logs_in)


@pytest.fixture(scope="module")
def docker_host(test_images: TestImages, request: pytest.FixtureRequest) -> Iterator[DockerHost]:
    host = DockerHost("dk", test_images)
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
        host = DockerHost(name, test_images)
        hosts.append(host)
        return host

    yield make
    failed = any(getattr(getattr(request.node, f"rep_{w}", None), "failed", False) for w in ("setup", "call"))
    for host in reversed(hosts):
        host.destroy(FAILED_LOGS / f"docker-{request.node.name}" if failed else None)


@pytest.fixture(params=[RUNC_RUNTIME, REVENANT_RUNTIME], ids=["runc", "revenant"])
def runtime(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def metadata_server() -> Iterator[MetadataServer]:
    srv = MetadataServer(("aws",)).start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def agent_factory(tmp_path: Path) -> Iterator[Callable[..., AgentProcess]]:
    """agent_factory(run_dir, metadata_url) -> a started `revenant agent` process (stopped at teardown)."""
    agents: list[AgentProcess] = []

    def make(run_dir: Path, metadata_url: str) -> AgentProcess:
        agent = AgentProcess(run_dir, metadata_url, tmp_path / f"agent-{len(agents)}.log")
        agents.append(agent)
        agent.start()
        return agent

    yield make
    for agent in agents:
        agent.stop()
