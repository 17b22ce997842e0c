"""The few libc calls Python's os module lacks, loaded once, with typed wrappers that raise OSError.

One ctypes handle for the whole process (`use_errno=True`, so errno is read from the call that failed,
not from whatever ran after it on the thread). Every wrapper raises `OSError(errno, "<call> ...: <strerror>")`
on failure; callers that treat an errno as an answer (umount2's EINVAL: nothing mounted) catch it.
Paths are passed to libc in the file system's encoding, as os does.
"""

from __future__ import annotations

import ctypes
import os
import threading

PR_SET_CHILD_SUBREAPER = 36
PR_SET_NAME = 15
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
SYNC_FILE_RANGE_WRITE = 0x2

_lib: ctypes.CDLL | None = None
_load_lock = threading.Lock()


def _libc() -> ctypes.CDLL:
    """The process's libc (the symbols the interpreter itself links), argument types declared once."""
    global _lib
    if _lib is None:
        with _load_lock:
            if _lib is None:
                lib = ctypes.CDLL(None, use_errno=True)
                c_str = ctypes.c_char_p
                lib.mount.argtypes = [c_str, c_str, c_str, ctypes.c_ulong, c_str]
                lib.mount.restype = ctypes.c_int
                lib.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
                lib.umount2.restype = ctypes.c_int
                lib.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
                lib.prctl.restype = ctypes.c_int
                lib.syncfs.argtypes = [ctypes.c_int]
                lib.syncfs.restype = ctypes.c_int
                lib.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
                lib.fallocate.restype = ctypes.c_int
                lib.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
                lib.sync_file_range.restype = ctypes.c_int
                _lib = lib
    return _lib


def _fail(what: str) -> OSError:
    err = ctypes.get_errno()
    return OSError(err, f"{what}: {os.strerror(err)}")


def mount(source: str, target: str | os.PathLike[str], fstype: str | None, flags: int, data: str | None) -> None:
    """mount(2). An empty fstype or data is passed as NULL (bind mounts, remounts, propagation changes)."""
    fs = fstype.encode() if fstype else None
    if _libc().mount(os.fsencode(source), os.fsencode(target), fs, flags, data.encode() if data else None) != 0:
        raise _fail(f"mount {fstype} {source} on {os.fsdecode(target)} (data {data!r})")


def umount2(target: str | os.PathLike[str], flags: int = 0) -> None:
    """umount2(2); EINVAL (not a mount point) and ENOENT arrive as OSError like any other errno."""
    if _libc().umount2(os.fsencode(target), flags) != 0:
        raise _fail(f"umount {os.fsdecode(target)}")


def set_child_subreaper() -> None:
    """prctl(PR_SET_CHILD_SUBREAPER, 1): orphans below this process are re-parented to it, not to init."""
    if _libc().prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise _fail("prctl(PR_SET_CHILD_SUBREAPER)")


def _overwrite_area(index: int, data: bytes, what: str) -> None:
    """Write `data` over the process's original argument (index 45) or environment (47) area, which
    /proc/self/cmdline and /proc/self/environ show, zeroing the rest; ValueError if it does not fit."""
    with open("/proc/self/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    start, end = int(fields[index]), int(fields[index + 1])  # stat fields 48-49 and 50-51
    if len(data) > end - start:
        raise ValueError(f"{what} of {len(data)} bytes does not fit in {end - start}")
    with open("/proc/self/mem", "r+b", buffering=0) as mem:
        mem.seek(start)
        mem.write(data.ljust(end - start, b"\0"))


def set_cmdline(argv: list[str]) -> None:
    """Make /proc/self/cmdline (what ps shows) read `argv`, and /proc/self/comm its program's base name:
    a process forked from another program (the shim zygote) otherwise shows that program's. Written over
    the original argument area, so it must fit in it (ValueError otherwise)."""
    _overwrite_area(45, b"\0".join(os.fsencode(a) for a in argv) + b"\0", "command line")
    name = ctypes.create_string_buffer(os.fsencode(os.path.basename(argv[0]))[:15])
    _libc().prctl(PR_SET_NAME, ctypes.addressof(name), 0, 0, 0)  # the kernel copies it


def set_environ_area(env: dict[str, str]) -> None:
    """Make /proc/self/environ read `env`. Only once os.environ no longer points into the original
    area (after it was cleared and set again: glibc then holds copies), and only if it fits."""
    data = b"".join(os.fsencode(k) + b"=" + os.fsencode(v) + b"\0" for k, v in env.items())
    _overwrite_area(47, data, "environment")


def syncfs(path: str | os.PathLike[str]) -> None:
    """syncfs(2) on the file system holding path (Python has os.sync, which flushes every file system)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        if _libc().syncfs(fd) != 0:
            raise _fail(f"syncfs {os.fsdecode(path)}")
    finally:
        os.close(fd)


def punch_hole(fd: int, offset: int, length: int) -> None:
    """fallocate(PUNCH_HOLE | KEEP_SIZE): free the range's blocks and page cache (dirty pages are
    dropped without being written back); the range reads as zeros, the size stays."""
    if _libc().fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        raise _fail(f"fallocate punch hole {offset}+{length}")


def start_writeback(fd: int, offset: int, length: int) -> None:
    """sync_file_range(WRITE): start writing the range's dirty pages back now, without waiting
    (length 0: to the end of the file), so they become clean and can be dropped from the cache."""
    if _libc().sync_file_range(fd, offset, length, SYNC_FILE_RANGE_WRITE) != 0:
        raise _fail(f"sync_file_range {offset}+{length}")


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (one we may not signal still exists)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
