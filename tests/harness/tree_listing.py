"""A full, comparable listing of a tree: type, mode, owner, xattrs, size, content digest, link target."""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
from pathlib import Path


def tree_listing(root: Path, skip_xattr_prefixes: tuple[str, ...] = ("trusted.overlay.",)) -> dict[str, tuple]:
    out: dict[str, tuple] = {}
    root = Path(root)
    inode_first: dict[tuple[int, int], str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            st = os.lstat(path)
            xattrs = {}
            with contextlib.suppress(OSError):
                for k in os.listxattr(path, follow_symlinks=False):
                    if not k.startswith(skip_xattr_prefixes):
                        xattrs[k] = os.getxattr(path, k, follow_symlinks=False).hex()
            entry: tuple = (
                stat.S_IFMT(st.st_mode),
                oct(stat.S_IMODE(st.st_mode)),
                st.st_uid,
                st.st_gid,
                tuple(sorted(xattrs.items())),
            )
            if stat.S_ISREG(st.st_mode):
                h = hashlib.sha256()
                with open(path, "rb") as f:
                    for chunk in iter(lambda f=f: f.read(1 << 20), b""):
                        h.update(chunk)
                link_group = ""
                if st.st_nlink > 1:
                    link_group = inode_first.setdefault((st.st_dev, st.st_ino), rel)
                entry += (st.st_size, h.hexdigest(), link_group)
            elif stat.S_ISLNK(st.st_mode):
                entry += (os.readlink(path),)
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                entry += (st.st_rdev,)
            out[rel] = entry
    return out


def diff_listings(a: dict[str, tuple], b: dict[str, tuple]) -> list[str]:
    lines = []
    for k in sorted(set(a) | set(b)):
        if a.get(k) != b.get(k):
            lines.append(f"{k}: {a.get(k)} != {b.get(k)}")
    return lines
