"""Store tests get the real S3, Azure (Azurite) and registry servers from tests/harness/servers.py."""

from harness.servers import (  # noqa: F401
    _azurite,
    _registry,
    _seaweed,
    azure_server,
    gs_server,
    oci_registry,
    s3_server,
)
