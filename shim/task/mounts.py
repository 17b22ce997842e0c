"""Mounting CreateTaskRequest.rootfs into bundle/rootfs (and undoing it), via mount(2) directly:
spawning mount(8) per container would cost milliseconds on every start."""

from __future__ import annotations

import errno
import logging
import os
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


# -- an overlay someone else mounted (dockerd's graph driver) --------------------------------------
MOUNTINFO = "/proc/self/mountinfo"


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash (and overlay its option separators) as \\ooo."""
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 4 <= len(field) and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


@dataclass(frozen=True)
class MountInfo:
    """One /proc/self/mountinfo line, unescaped."""

    mount_point: str
    mount_options: tuple[str, ...]
    fstype: str
    source: str
    super_options: tuple[str, ...]

    def super_option(self, name: str) -> str | None:
        prefix = name + "="
        for o in self.super_options:
            if o.startswith(prefix):
                return o[len(prefix) :]
        return None


def parse_mountinfo_line(line: str) -> MountInfo:
    fields = line.split()
    sep = fields.index("-", 6)  # optional fields (shared:N, master:N) end at a lone "-"
    # Split on the separators before unescaping: an escaped comma is part of a value, not a separator.
    return MountInfo(
        mount_point=_unescape(fields[4]),
        mount_options=tuple(_unescape(o) for o in fields[5].split(",")),
        fstype=fields[sep + 1],
        source=_unescape(fields[sep + 2]),
        super_options=tuple(_unescape(o) for o in fields[sep + 3].split(",")) if len(fields) > sep + 3 else (),
    )


def read_mountinfo(path: str = MOUNTINFO) -> list[MountInfo]:
    with open(path) as f:
        return [parse_mountinfo_line(line) for line in f if line.strip()]


def overlay_at(mount_point: str, mountinfo: list[MountInfo] | None = None) -> MountInfo | None:
    """The overlay mounted on top at `mount_point` (a rootfs mounted before the shim ran, as dockerd's
    graph driver does), or None when the topmost mount there is no overlay.

    Refused (ValueError) when its upper dir is shared with another mounted overlay: a writable layer
    restored into it would show up in another container."""
    infos = read_mountinfo() if mountinfo is None else mountinfo
    target = os.path.realpath(mount_point)
    here = [m for m in infos if m.mount_point == target]
    if not here or here[-1].fstype != "overlay":  # later lines are mounted on top of earlier ones
        return None
    top = here[-1]
    upper = top.super_option("upperdir")
    if upper is None:
        return None  # a read-only overlay: no writable layer to carry
    others = [
        m.mount_point for m in infos if m.fstype == "overlay" and m is not top and m.super_option("upperdir") == upper
    ]
    if others:
        raise ValueError(f"the upper dir {upper} of the overlay at {target} is also the upper dir of {others}")
    return top


def overlay_remount_data(m: MountInfo) -> str:
    """The mount(2) data that mounts the overlay `m` again; ValueError when its paths make that impossible
    (checked before anything is unmounted)."""
    data = [o for o in m.super_options if o not in ("rw", "ro")]
    for o in data:
        # The kernel splits overlay options on ","; upper and work dirs cannot hold ":" either.
        if "," in o or (o.startswith(("upperdir=", "workdir=")) and ":" in o):
            raise ValueError(f"cannot mount the overlay at {m.mount_point} again: option {o!r} holds a separator")
    return ",".join(data)


def remount_overlay(m: MountInfo) -> None:
    """Mount an overlay again as `m` described it (after its upper dir was filled while unmounted)."""
    flags, _propagation, _ = parse_options(o for o in m.mount_options if o in _FLAGS)
    _mount(m.source, m.mount_point, "overlay", flags, overlay_remount_data(m))


def unmount_busy_fails(target: str) -> None:
    """Unmount the topmost mount at target, failing (never detaching) while it is in use."""
    libc.umount2(target)  # OSError with umount2's errno (EBUSY while in use)
