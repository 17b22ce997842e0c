"""Fixtures for the ttrpc tests: a real Server on a real unix socket under tmp_path."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from harness.unixsock import listen_unix
from shim.ttrpc import Server, Service


@dataclass
class RunningServer:
    server: Server
    path: Path
    thread: threading.Thread

    @property
    def address(self) -> str:
        return f"unix://{self.path}"


@pytest.fixture
def serve(tmp_path: Path) -> Iterator:
    """serve(*services) -> RunningServer; every server started is shut down after the test."""
    started: list[RunningServer] = []

    def start(*services: Service, name: str = "ttrpc.sock") -> RunningServer:
        server = Server(services)
        path = tmp_path / name
        listener = listen_unix(path)
        thread = threading.Thread(target=server.serve, args=(listener,), daemon=True)
        thread.start()
        running = RunningServer(server, path, thread)
        started.append(running)
        return running

    try:
        yield start
    finally:
        for running in started:
            running.server.shutdown(grace=1.0)
            running.thread.join(10)
