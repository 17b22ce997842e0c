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


# Modes a restore honours. A checkpoint holds CRIU images and a writable-layer tar, none of which ever
# needs setuid, setgid or sticky bits, nor group/other write: those are dropped whatever the manifest
# says, so a forged manifest cannot plant a setuid-root binary or a world-writable file on the node.
# (The layer's own file modes live inside its tar and are applied by shim/layer.py, not here.)
RESTORE_MODE_MASK = 0o755
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class TreeWriter:
    """Creates manifest entries below an open directory, openat-style: no path is ever resolved through
    a symlink or outside the root (each component is opened with O_NOFOLLOW relative to its parent), and
    nothing that exists is reused (O_EXCL, mkdir, symlink all fail on an existing name).
    """

    def __init__(self, root_fd: int, is_root: bool) -> None:
        self.root_fd = root_fd
        self.is_root = is_root
        self._cached: tuple[str, int] | None = None  # (parent path, fd): entries come grouped by dir

    def _parent(self, path: str) -> tuple[int, str]:
        """(fd of the entry's parent dir, its last component)."""
        parent, _, name = path.rpartition("/")
        if not parent:
            return self.root_fd, name
        if self._cached and self._cached[0] == parent:
            return self._cached[1], name
        fd = os.dup(self.root_fd)
        try:
            for comp in parent.split("/"):
                nxt = os.open(comp, _DIR_FLAGS, dir_fd=fd)
                os.close(fd)
                fd = nxt
        except BaseException:
            os.close(fd)
            raise
        self._drop_cache()
        self._cached = (parent, fd)
        return fd, name

    def _drop_cache(self) -> None:
        if self._cached:
            os.close(self._cached[1])
            self._cached = None

    def mkdir(self, path: str) -> None:
        dfd, name = self._parent(path)
        os.mkdir(name, 0o700, dir_fd=dfd)

    def symlink(self, path: str, target: str) -> None:
        dfd, name = self._parent(path)
        os.symlink(target, name, dir_fd=dfd)

    def create(self, path: str) -> int:
        dfd, name = self._parent(path)
        return os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dfd)

    def metadata(self, entry: dict[str, Any]) -> None:
        """Owner (only as root), mode (masked) and mtime of one entry, never following a symlink."""
        dfd, name = self._parent(entry["path"])
        if self.is_root:  # ids are range-checked by the manifest validator
            os.chown(name, entry["uid"], entry["gid"], dir_fd=dfd, follow_symlinks=False)
        if entry["type"] == "symlink":
            return
        # chmod after chown (chown clears setuid bits, which the mask drops anyway); the entry's type was
        # created by this restore, so no symlink can stand at `name` here.
        os.chmod(name, entry["mode"] & RESTORE_MODE_MASK, dir_fd=dfd, follow_symlinks=False)
        os.utime(name, (entry["mtime"], entry["mtime"]), dir_fd=dfd, follow_symlinks=False)

    def close(self) -> None:
        self._drop_cache()
