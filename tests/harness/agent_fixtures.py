"""Fixtures for tests that drive a real `revenant agent` against a local cloud metadata server.

A conftest imports them by name (`from harness.agent_fixtures import agent_factory, metadata_server`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from .metadata_server import MetadataServer
from .protect import AgentProcess


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
