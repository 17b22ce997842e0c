"""Local resources of protection that need root to set up: a staging root owned by another user, and a
restore scratch too small for the checkpoint (a real 1 MiB tmpfs)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from shim.protect.checkpointer import CRIU_DIR
from shim.protect.policy import Protection
from shim.protect.restorer import Restorer, RestoreUnavailable
from shim.protect.staging import UnsafeStagingDir, secure_root
from shim.store import open_store


def test_a_root_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "staging"
    root.mkdir(mode=0o700)
    os.chown(root, 65534, 65534)
    with pytest.raises(UnsafeStagingDir, match="belongs to uid 65534"):
        secure_root(root)


@pytest.fixture
def small_tmpfs(tmp_path: Path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_no_room_for_the_checkpoint_is_an_outage(tmp_path: Path, small_tmpfs: Path) -> None:
    url = f"file://{tmp_path / 'store'}"
    src = tmp_path / "src"
    (src / CRIU_DIR).mkdir(parents=True)
    (src / CRIU_DIR / "pages-1.img").write_bytes(os.urandom(4 << 20))
    with open_store(url) as store:
        store.put("team/job", src, metadata={})
    protection = Protection(key="team/job", store=url, interval_s=0, checkpoint_on_stop=False, keep=3)
    with pytest.raises(RestoreUnavailable, match="MiB free"):
        Restorer().prepare(protection, small_tmpfs, None, None)
    assert not list(small_tmpfs.iterdir())
