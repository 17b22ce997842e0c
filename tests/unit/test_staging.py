"""Staging and restore scratch hold a job's whole memory: root-owned 0700 roots (checked with lstat),
a free-space check before the dump, and a sweep of what a killed shim left behind."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from shim.protect.staging import UnsafeStagingDir, make_staging_dir, secure_root, sweep_leftovers


def test_a_missing_root_is_created_0700(tmp_path: Path) -> None:
    root = secure_root(tmp_path / "a" / "staging")
    assert (os.lstat(root).st_mode & 0o777) == 0o700


def test_a_world_writable_root_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "staging"
    root.mkdir()
    root.chmod(0o777)  # someone created /dev/shm/revenant first
    with pytest.raises(UnsafeStagingDir, match=r"mode 0777, not 0700"):
        secure_root(root)


def test_a_symlinked_root_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.mkdir(mode=0o700)
    (tmp_path / "staging").symlink_to(target)
    with pytest.raises(UnsafeStagingDir, match="is a symlink"):
        secure_root(tmp_path / "staging")


def test_an_unsafe_tmpfs_root_falls_back_to_the_scratch_dir(tmp_path: Path) -> None:
    shm = tmp_path / "shm"
    shm.mkdir()
    shm.chmod(0o777)
    staging = make_staging_dir(shm, tmp_path / "scratch", 1 << 20, prefix="c1-")
    assert staging.parent == tmp_path / "scratch"
    assert staging.name.startswith(f"{os.getpid()}-c1-")
    assert (os.lstat(staging).st_mode & 0o777) == 0o700


def test_no_room_anywhere_fails_before_the_dump(tmp_path: Path) -> None:
    with pytest.raises(OSError) as e:
        make_staging_dir(tmp_path / "shm", tmp_path / "scratch", 1 << 60, prefix="c1-")
    assert e.value.errno == errno.ENOSPC and "MiB free" in str(e.value)
    assert not list((tmp_path / "shm").iterdir()) and not list((tmp_path / "scratch").iterdir())


def test_leftovers_of_a_dead_shim_are_swept_and_live_ones_kept(tmp_path: Path) -> None:
    root = secure_root(tmp_path / "staging")
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)  # a shim that was killed: its pid no longer runs
    gone = root / f"{pid}-job-abc"
    gone.mkdir()
    (gone / "pages-1.img").write_bytes(b"secret memory")
    live = root / f"{os.getppid()}-job-def"
    live.mkdir()
    mine = root / f"{os.getpid()}-job-ghi"
    mine.mkdir()
    foreign = root / "not-ours"
    foreign.mkdir()
    assert sweep_leftovers(root) == [gone]
    assert not gone.exists() and live.exists() and mine.exists() and foreign.exists()
