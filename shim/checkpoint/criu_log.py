"""Pulling the lines that explain a CRIU failure out of its dump.log / restore.log."""

from __future__ import annotations

import re
from pathlib import Path

# CRIU prints this on every run on machines without CAP_SYS_RESOURCE; it is harmless noise.
_HARMLESS = (re.compile(r"rlimit: Can't setup RLIMIT_NOFILE"),)
_ERROR = re.compile(r"\bError \(|\bWarn.*fail|\bfailed\b", re.IGNORECASE)


def error_lines(log: Path, limit: int = 5) -> list[str]:
    """The last `limit` error lines of a CRIU log, harmless known noise left out."""
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return []
    lines = [
        line.strip() for line in text.splitlines() if _ERROR.search(line) and not any(h.search(line) for h in _HARMLESS)
    ]
    return lines[-limit:]
