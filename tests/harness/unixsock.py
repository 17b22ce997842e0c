"""Unix socket helpers for tests that run servers of their own (the ttrpc tests)."""

from __future__ import annotations

import socket
from pathlib import Path


def listen_unix(path: Path | str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen(64)
    return sock
