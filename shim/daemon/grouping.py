"""Which shim a container goes to, and that shim's socket path.

Imported by `start` on every container start (shim.daemon.main) and by the shim server: standard
library only, nothing costly at import.
"""

from __future__ import annotations

import os

SOCKET_DIR = "/run/containerd/s"
GROUP_ANNOTATIONS = (b"io.kubernetes.cri.sandbox-id",)
SHARED_GROUP = "revenant-shared-shim"


def socket_path(address: str, namespace: str, group: str) -> str:
    import posixpath

    try:
        from _sha256 import sha256  # type: ignore[import-not-found]  # the builtin; hashlib would load OpenSSL first
    except ImportError:
        from hashlib import sha256
    key = posixpath.normpath(posixpath.join(address, namespace, group))
    return f"{SOCKET_DIR}/{sha256(key.encode()).hexdigest()}"


def shared_shims() -> bool:
    """One shim per containerd and namespace instead of one per container (REVENANT_SHIM_SHARED=1 in
    containerd's environment). Off by default: a shared shim that dies takes every task of its
    namespace with it, and protecting a long job matters more here than ~150 ms of start-up."""
    return os.environ.get("REVENANT_SHIM_SHARED", "0") in ("1", "true", "yes")


def group_of(cid: str) -> str:
    """The shim a container goes to (cwd = its bundle). A CRI pod's containers share their sandbox's
    shim (as with containerd's runc shim); other containers get their own shim, or, with
    REVENANT_SHIM_SHARED=1, share one per containerd and namespace (a Python server started and paid
    for once)."""
    try:
        with open("config.json", "rb") as f:
            data = f.read()
    except OSError:
        data = b""
    if any(key in data for key in GROUP_ANNOTATIONS):
        import json

        annotations = json.loads(data).get("annotations") or {}
        for key in GROUP_ANNOTATIONS:
            if annotations.get(key.decode()):
                return str(annotations[key.decode()])
    return SHARED_GROUP if shared_shims() else cid
