"""Reading a secret from a file on the node: a store key, an HMAC secret, a connection string.

The shim runs as root, so a secret file is trusted only when nobody else could have written or read
it: a regular file (a link is not followed), owned by this user, closed to group and others, and no
larger than the caller expects. Errors name the file and what it is for, never its content.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from .errors import StoreError


def read_private_file(path: Path, what: str, limit: int, *, absolute: bool = False) -> bytes:
    """The bytes of `path` (at most `limit`), after the checks above; `what` names it in errors."""
    if absolute and not path.is_absolute():
        raise StoreError(f"{what} {str(path)!r} must be an absolute path")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError as e:
        raise StoreError(f"{what} {path}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise StoreError(f"{what} {path}: not a regular file")
        if st.st_mode & 0o077:
            mode = stat.S_IMODE(st.st_mode)
            raise StoreError(f"{what} {path}: mode {mode:04o} lets group or others in; chmod 600 it")
        if st.st_uid != os.geteuid():
            raise StoreError(f"{what} {path}: owned by uid {st.st_uid}, not by this user ({os.geteuid()})")
        raw = os.read(fd, limit + 1)
    finally:
        os.close(fd)
    if len(raw) > limit:
        raise StoreError(f"{what} {path}: larger than {limit} bytes, refused")
    return raw
