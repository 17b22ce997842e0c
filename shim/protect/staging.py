"""Where a checkpoint is assembled before it goes to the store, and where a fetched one waits.

Memory-backed staging (tmpfs, /dev/shm by default) keeps the task's freeze short: CRIU writes pages
at memory speed instead of disk speed, and the job runs on while the chunks are hashed, compressed and
uploaded. When tmpfs lacks room for the expected image, staging falls back to the node's on-disk
scratch directory (`scratch_dir`), which also holds checkpoints fetched for a restore.

Both roots hold every secret of every job checkpointed on the node, so each must be a real
directory owned by root (the shim's user) and closed to everyone else (0700), checked with lstat:
a root someone else created first (0777, a symlink, another owner) is refused, never used.
Entries are named `<shim pid>-...`, so a shim starting up sweeps what a killed shim left behind.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import stat
import tempfile
from pathlib import Path

from shim.libc import pid_alive

log = logging.getLogger(__name__)

HEADROOM = 1.25  # CRIU images run a little larger than the resident set they dump
_OWNED = re.compile(r"^(\d+)-")


class UnsafeStagingDir(OSError):
    """A staging or scratch root that another user could read or swap (named with the reason)."""


def owned_name(prefix: str) -> str:
    """The name prefix of an entry this shim owns: `<pid>-<prefix>` (see sweep_leftovers)."""
    return f"{os.getpid()}-{prefix}"


def secure_root(path: Path) -> Path:
    """Create `path` 0700 if missing; refuse it unless it is a real directory of ours, closed to others."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        raise UnsafeStagingDir(errno.EPERM, f"staging root {path} is a symlink; refusing it")
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafeStagingDir(errno.ENOTDIR, f"staging root {path} is not a directory")
    if st.st_uid != os.geteuid():
        raise UnsafeStagingDir(
            errno.EPERM, f"staging root {path} belongs to uid {st.st_uid}, not {os.geteuid()}; refusing it"
        )
    if st.st_mode & 0o077:
        raise UnsafeStagingDir(
            errno.EPERM, f"staging root {path} has mode {stat.S_IMODE(st.st_mode):04o}, not 0700; refusing it"
        )
    return path


def process_tree_rss(pid: int) -> int:
    """Resident bytes of pid and its descendants (what CRIU is about to write)."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            continue
    return total


def make_staging_dir(preferred: Path, fallback: Path, expected_bytes: int, prefix: str) -> Path:
    """A fresh directory in `preferred` (tmpfs) when it has room for `expected_bytes`, else in
    `fallback` (disk) when that has; an OSError naming both roots when neither is safe and large enough.
    The check runs before the task is frozen: a dump that cannot fit is never started."""
    need = int(expected_bytes * HEADROOM)
    problems: list[str] = []
    for base in (preferred, fallback):
        try:
            secure_root(base)
            free = shutil.disk_usage(base).free
        except UnsafeStagingDir as e:
            log.error("%s", e.strerror)
            problems.append(str(e.strerror))
            continue
        except OSError as e:
            log.warning("staging dir %s unusable: %s", base, e)
            problems.append(f"{base}: {e}")
            continue
        if free >= need:
            return Path(tempfile.mkdtemp(prefix=owned_name(prefix), dir=base))
        problems.append(f"{base} has {free >> 20} MiB free")
        log.info("staging: %s has %d MiB free, %d MiB expected", base, free >> 20, need >> 20)
    raise OSError(errno.ENOSPC, f"no staging directory for a {need >> 20} MiB checkpoint: " + "; ".join(problems))


def remove_staging_dir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    if path.exists():
        log.warning("could not remove staging dir %s", path)


def sweep_leftovers(*roots: Path) -> list[Path]:
    """Remove entries of shims that are gone (a killed shim's staged dump or restore scratch)."""
    removed: list[Path] = []
    for root in roots:
        try:
            secure_root(root)
            entries = list(os.scandir(root))
        except OSError as e:
            log.warning("cannot sweep %s: %s", root, e)
            continue
        for entry in entries:
            m = _OWNED.match(entry.name)
            if m is None or int(m[1]) == os.getpid() or pid_alive(int(m[1])):
                continue
            path = Path(entry.path)
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
            log.info("removed %s, left behind by shim pid %s", path, m[1])
    return removed


def runtime_versions() -> dict[str, str]:
    """runc and CRIU versions for the checkpoint's metadata (restores across versions are a risk)."""
    import subprocess

    versions: dict[str, str] = {}
    for name, args in (("runc", ["runc", "--version"]), ("criu", ["criu", "--version"])):
        try:
            out = subprocess.run(args, capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.TimeoutExpired):
            continue
        first = out.splitlines()[0] if out else ""
        versions[name] = first.split(":", 1)[-1].strip().removeprefix("runc version ").strip()
    versions["kernel"] = os.uname().release
    return versions
