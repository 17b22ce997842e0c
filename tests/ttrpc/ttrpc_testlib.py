"""Helpers shared by the ttrpc tests (imported by name: tests/ttrpc is on sys.path under pytest)."""

from __future__ import annotations

import socket
from pathlib import Path


def listen_unix(path: Path | str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen(64)
    return sock
