"""Store tests get the real S3 and registry servers from tests/harness/servers.py."""

from harness.servers import _registry, _seaweed, gs_server, oci_registry, s3_server  # noqa: F401
