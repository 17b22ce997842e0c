"""Mounting CreateTaskRequest.rootfs into bundle/rootfs (and undoing it), via mount(2) directly:
spawning mount(8) per container would cost milliseconds on every start."""

from __future__ import annotations

import errno
import logging
from collections.abc import Iterable
from dataclasses import dataclass

from shim import libc

log = logging.getLogger(__name__)

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_SYNCHRONOUS, MS_REMOUNT, MS_MANDLOCK, MS_DIRSYNC = 16, 32, 64, 128
MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_REC = 1024, 2048, 4096, 16384
MS_PRIVATE, MS_SLAVE, MS_SHARED, MS_RELATIME, MS_STRICTATIME = 1 << 18, 1 << 19, 1 << 20, 1 << 21, 1 << 24
MNT_DETACH = 2

# option -> (clear?, flag), as mount(8) and containerd's mount package read them
_FLAGS: dict[str, tuple[bool, int]] = {
    "async": (True, MS_SYNCHRONOUS),
    "atime": (True, MS_NOATIME),
    "bind": (False, MS_BIND),
    "defaults": (False, 0),
    "dev": (True, MS_NODEV),
    "diratime": (True, MS_NODIRATIME),
    "dirsync": (False, MS_DIRSYNC),
    "exec": (True, MS_NOEXEC),
    "mand": (False, MS_MANDLOCK),
    "noatime": (False, MS_NOATIME),
    "nodev": (False, MS_NODEV),
    "nodiratime": (False, MS_NODIRATIME),
    "noexec": (False, MS_NOEXEC),
    "nomand": (True, MS_MANDLOCK),
    "norelatime": (True, MS_RELATIME),
    "nostrictatime": (True, MS_STRICTATIME),
    "nosuid": (False, MS_NOSUID),
    "rbind": (False, MS_BIND | MS_REC),
    "relatime": (False, MS_RELATIME),
    "remount": (False, MS_REMOUNT),
    "ro": (False, MS_RDONLY),
    "rw": (True, MS_RDONLY),
    "strictatime": (False, MS_STRICTATIME),
    "suid": (True, MS_NOSUID),
    "sync": (False, MS_SYNCHRONOUS),
}
_PROPAGATION = {
    "private": MS_PRIVATE,
    "rprivate": MS_PRIVATE | MS_REC,
    "slave": MS_SLAVE,
    "rslave": MS_SLAVE | MS_REC,
    "shared": MS_SHARED,
    "rshared": MS_SHARED | MS_REC,
}


@dataclass(frozen=True)
class Mount:
    type: str
    source: str
    options: tuple[str, ...] = ()


def parse_options(options: Iterable[str]) -> tuple[int, int, str]:
    """(flags, propagation flags, data string)."""
    flags, propagation, data = 0, 0, []
    for opt in options:
        if opt in _FLAGS:
            clear, flag = _FLAGS[opt]
            flags = flags & ~flag if clear else flags | flag
        elif opt in _PROPAGATION:
            propagation |= _PROPAGATION[opt]
        else:
            data.append(opt)
    return flags, propagation, ",".join(data)


def _mount(source: str, target: str, fstype: str, flags: int, data: str) -> None:
    libc.mount(source, target, fstype, flags, data)


def mount(m: Mount, target: str) -> None:
    flags, propagation, data = parse_options(m.options)
    fstype = m.type
    if fstype == "bind" or flags & MS_BIND:
        fstype = ""
        _mount(m.source, target, "", flags & ~MS_RDONLY, data)
        if flags & MS_RDONLY:  # a bind mount takes read-only only on a remount
            _mount("", target, "", flags | MS_REMOUNT, data)
    else:
        _mount(m.source, target, fstype, flags, data)
    if propagation:
        _mount("", target, "", propagation, "")


def mount_all(mounts: Iterable[Mount], target: str) -> None:
    done = 0
    try:
        for m in mounts:
            mount(m, target)
            done += 1
    except BaseException:
        for _ in range(done):
            unmount(target)
        raise


def unmount(target: str) -> bool:
    """Unmount the topmost mount at target; False when nothing is mounted there."""
    try:
        libc.umount2(target)
        return True
    except OSError as e:
        if e.errno in (errno.EINVAL, errno.ENOENT):
            return False
        if e.errno != errno.EBUSY:
            raise
    try:
        libc.umount2(target, MNT_DETACH)  # busy: detach it now, the kernel frees it when the last user goes
        return True
    except OSError:
        return False


def unmount_all(target: str) -> None:
    """Unmount every mount stacked on target."""
    for _ in range(64):
        if not unmount(target):
            return
    log.warning("still mounts on %s after 64 unmounts", target)
