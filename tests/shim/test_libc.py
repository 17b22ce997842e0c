"""shim.libc against the real kernel (root, like the rest of tests/shim): each wrapper does its call and
turns a failure into an OSError carrying the call's own errno."""

from __future__ import annotations

import errno
import subprocess
import sys
from pathlib import Path

import pytest

from shim import libc
from shim.task import mounts


def _mounted(path: Path) -> bool:
    # os.path.ismount cannot see a bind mount within one file system (same device): ask the kernel
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == str(path) for line in f)


def test_bind_mount_then_umount(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    (src / "f").write_text("seen through the bind")
    libc.mount(str(src), dst, None, mounts.MS_BIND, None)
    try:
        assert (dst / "f").read_text() == "seen through the bind"
        assert _mounted(dst)
    finally:
        libc.umount2(dst)
    assert not _mounted(dst) and not (dst / "f").exists()


def test_umount2_of_a_plain_directory_is_einval(tmp_path: Path) -> None:
    with pytest.raises(OSError) as err:
        libc.umount2(tmp_path)
    assert err.value.errno == errno.EINVAL and str(tmp_path) in str(err.value)
    assert mounts.unmount(str(tmp_path)) is False  # the caller that reads EINVAL as "nothing mounted"


def test_mount_failure_names_the_call_and_keeps_errno(tmp_path: Path) -> None:
    with pytest.raises(OSError) as err:
        libc.mount(str(tmp_path / "missing"), tmp_path, None, mounts.MS_BIND, None)
    assert err.value.errno == errno.ENOENT and "missing" in str(err.value)


def test_syncfs(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"x")
    libc.syncfs(tmp_path)
    libc.syncfs(tmp_path / "f")  # a file works too: the call takes any fd on the file system
    with pytest.raises(FileNotFoundError):
        libc.syncfs(tmp_path / "missing")


def test_child_subreaper_adopts_orphans() -> None:
    # A process marked subreaper forks a child that forks a grandchild and exits: the orphaned grandchild
    # must be re-parented to the marked process, not to init.
    code = """
import os, sys, time
from shim import libc
libc.set_child_subreaper()
r, w = os.pipe()
if os.fork() == 0:
    middle = os.getpid()
    if os.fork() == 0:
        deadline = time.monotonic() + 10
        while os.getppid() == middle and time.monotonic() < deadline:
            time.sleep(0.01)  # until the middle process has exited and this one is re-parented
        os.write(w, str(os.getppid()).encode())
        os._exit(0)
    os._exit(0)
os.close(w)
os.wait()
print(os.read(r, 32).decode(), os.getpid())
os.wait()
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True)
    parent_seen, subreaper = out.stdout.split()
    assert parent_seen == subreaper
