"""Reading a directory tree into manifest entries and data extents (sparse-aware), and restoring it."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def scan_tree(src: Path) -> list[dict[str, Any]]:
    """Entries for every directory, regular file and symlink under src (sorted, relative paths)."""
    entries: list[dict[str, Any]] = []
    for dirpath, dirnames, filenames in os.walk(src):
        dirnames.sort()
        rel_dir = os.path.relpath(dirpath, src)
        for name in [*dirnames, *sorted(filenames)]:
            full = os.path.join(dirpath, name)
            rel = name if rel_dir == "." else f"{rel_dir}/{name}"
            st = os.lstat(full)
            base = {
                "path": rel,
                "mode": stat.S_IMODE(st.st_mode),
                "mtime": st.st_mtime,
                "uid": st.st_uid,
                "gid": st.st_gid,
            }
            if stat.S_ISLNK(st.st_mode):
                entries.append({**base, "type": "symlink", "target": os.readlink(full)})
            elif stat.S_ISDIR(st.st_mode):
                entries.append({**base, "type": "dir"})
            elif stat.S_ISREG(st.st_mode):
                entries.append({**base, "type": "file", "size": st.st_size, "chunks": []})
            # sockets, fifos, devices: not part of a checkpoint's files; skipped on purpose
    return entries


def data_extents(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """(offset, length) of the regions holding data; holes of sparse files are skipped."""
    off = 0
    while off < size:
        try:
            start = os.lseek(fd, off, os.SEEK_DATA)
        except OSError:  # ENXIO: only a hole remains
            return
        end = os.lseek(fd, start, os.SEEK_HOLE)
        end = min(end, size)
        if end > start:
            yield start, end - start
        off = end


def apply_metadata(path: Path, entry: dict[str, Any], is_root: bool) -> None:
    if entry["type"] == "symlink":
        if is_root:
            os.lchown(path, entry["uid"], entry["gid"])
        return
    if is_root:
        os.chown(path, entry["uid"], entry["gid"])
    os.chmod(path, entry["mode"])
    os.utime(path, (entry["mtime"], entry["mtime"]))
