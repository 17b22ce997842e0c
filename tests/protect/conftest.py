"""Fixtures for the protection tests: two harness nodes with the memjob image, the S3 server, the local
metadata server, and a real `revenant agent` process."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from harness.metadata_server import MetadataServer  # noqa: E402
from harness.protect import AgentProcess  # noqa: E402
from tests.harness.servers import _seaweed, s3_server  # noqa: E402, F401


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
