"""Store tests get the real S3 and registry servers from tests/harness/servers.py."""

import sys
from pathlib import Path

_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from tests.harness.servers import _registry, _seaweed, oci_registry, s3_server  # noqa: E402, F401
