"""Fixtures for the protection tests: two harness nodes with the memjob image, the S3 server, the local
metadata server, and a real `revenant agent` process."""

from __future__ import annotations

import sys
from pathlib import Path

_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from harness.agent_fixtures import agent_factory, metadata_server  # noqa: E402, F401
from tests.harness.servers import _seaweed, s3_server  # noqa: E402, F401
