"""An applied writable layer is made durable by fsyncing its own files and directories, not by a
syncfs that would also write back the GiBs of CRIU images a restore has just put on the same disk;
a layer too large for per-file fsyncs still gets one syncfs."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

import shim.layer as layer
from shim.layer import apply_writable_layer, capture_writable_layer, verify_layer


def _layer(tmp_path: Path, files: int) -> Path:
    up = tmp_path / "up"
    (up / "etc/deep").mkdir(parents=True)
    for i in range(files):
        (up / "etc/deep" / f"f{i}").write_text(f"{i}\n")
    os.symlink("deep/f0", up / "etc/link")
    os.mkfifo(up / "etc/fifo")
    capture_writable_layer(up, tmp_path / "out")
    return verify_layer(tmp_path / "out")


def _forget(synced: dict[str, list[str]]) -> None:
    for seen in synced.values():
        seen.clear()  # the capture's own fsyncs


@pytest.fixture
def synced(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[str]]:
    """Records what apply_writable_layer fsyncs (by path) and syncfs-es, still doing both."""
    seen: dict[str, list[str]] = {"fsync": [], "syncfs": []}
    real_fsync, real_syncfs = os.fsync, layer.libc.syncfs

    def fsync(fd: int) -> None:
        seen["fsync"].append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    def syncfs(path: str | os.PathLike[str]) -> None:
        seen["syncfs"].append(os.fspath(path))
        real_syncfs(path)

    monkeypatch.setattr(layer.os, "fsync", fsync)
    monkeypatch.setattr(layer.libc, "syncfs", syncfs)
    return seen


def test_a_small_layer_fsyncs_each_file_and_directory_and_no_file_system(
    tmp_path: Path, synced: dict[str, list[str]]
) -> None:
    tar_path = _layer(tmp_path, files=3)
    target = tmp_path / "target"
    target.mkdir()
    _forget(synced)
    apply_writable_layer(tar_path, target)
    assert synced["syncfs"] == []
    files = {str(target / "etc/deep" / f"f{i}") for i in range(3)}
    dirs = {str(target), str(target / "etc"), str(target / "etc/deep")}
    assert set(synced["fsync"]) == files | dirs
    # directories after the files they hold: their fsync commits the entries' metadata too
    assert max(synced["fsync"].index(f) for f in files) < min(synced["fsync"].index(d) for d in dirs)
    assert (target / "etc/deep/f2").read_text() == "2\n" and os.readlink(target / "etc/link") == "deep/f0"


def test_a_large_layer_is_made_durable_by_one_syncfs(
    tmp_path: Path, synced: dict[str, list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(layer, "FSYNC_EACH_MAX", 4)
    tar_path = _layer(tmp_path, files=5)
    target = tmp_path / "target"
    target.mkdir()
    _forget(synced)
    apply_writable_layer(tar_path, target)
    assert synced["syncfs"] == [str(target)] and synced["fsync"] == []
    assert sorted(p.name for p in (target / "etc/deep").iterdir()) == [f"f{i}" for i in range(5)]


def test_entries_replaced_later_in_the_tar_are_not_fsynced_as_what_they_were(tmp_path: Path) -> None:
    """A directory replaced by a file, a file by a symlink, a file removed by a whiteout, all in one tar
    (found by the layer fuzzer: the durability pass opened `a` as the directory it no longer was)."""
    import io
    import tarfile

    tar_path = tmp_path / "layer.tar"
    with tarfile.open(tar_path, "w") as tar:

        def add(name: str, kind: bytes, data: bytes = b"", linkname: str = "") -> None:
            info = tarfile.TarInfo(name)
            info.type, info.size, info.linkname, info.mode = kind, len(data), linkname, 0o644
            tar.addfile(info, io.BytesIO(data) if data else None)

        add("a", tarfile.DIRTYPE)
        add("a/a", tarfile.DIRTYPE)
        add("a/a/f", tarfile.REGTYPE, b"gone with a\n")
        add("a", tarfile.REGTYPE, b"now a file\n")
        add("b", tarfile.REGTYPE, b"soon a link\n")
        add("b", tarfile.SYMTYPE, linkname="a")
        add("c", tarfile.REGTYPE, b"soon gone\n")
        add(".wh.c", tarfile.REGTYPE)
    target = tmp_path / "target"
    target.mkdir()
    apply_writable_layer(tar_path, target)
    assert (target / "a").read_text() == "now a file\n"
    assert os.readlink(target / "b") == "a"
    st = os.lstat(target / "c")  # in an overlay upper dir a whiteout is a 0/0 character device
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0 and not (target / ".wh.c").exists()
