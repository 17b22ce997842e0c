"""Checkpoint tests get the real registry server from tests/harness/servers.py."""

from harness.servers import _registry, oci_registry  # noqa: F401
