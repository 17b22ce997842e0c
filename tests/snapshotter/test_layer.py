"""Writable-layer capture/restore on real overlay mounts (no containerd needed), and hostile diffs."""

from __future__ import annotations

import io
import os
import subprocess
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from harness.tree_listing import diff_listings, tree_listing
from revenant_pb.containerd.types import mount_pb2
from shim.errors import InvalidArgument
from shim.layer import (
    LAYER_FILE,
    LayerError,
    apply_writable_layer,
    capture_writable_layer,
    upper_dir_of,
    verify_layer,
)
from snapshotter.metadata import FailedPrecondition
from snapshotter.overlay import Mount


@contextmanager
def overlay(lower: Path, upper: Path, work: Path, merged: Path) -> Iterator[Path]:
    merged.mkdir(exist_ok=True)
    work.mkdir(exist_ok=True)
    opts = f"index=off,lowerdir={lower},upperdir={upper},workdir={work}"
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, str(merged)], check=True)
    try:
        yield merged
    finally:
        subprocess.run(["umount", str(merged)], check=True)


def make_lower(lower: Path) -> None:
    (lower / "data/replace-dir").mkdir(parents=True)
    (lower / "data/sub").mkdir()
    (lower / "data/keep.txt").write_text("keep\n")
    (lower / "data/delete-me.txt").write_text("delete me\n")
    (lower / "data/rename-me.txt").write_text("rename me\n")
    (lower / "data/replace-dir/old.txt").write_text("old\n")
    (lower / "data/sub/lower.txt").write_text("lower\n")
    (lower / "etc").mkdir()
    (lower / "etc/config").write_text("a=1\n")


def mutate(m: Path) -> None:
    """What a container does to its rootfs: every kind of change the diff must carry."""
    (m / "data/delete-me.txt").unlink()  # whiteout over a lower file
    os.rename(m / "data/rename-me.txt", m / "data/renamed.txt")
    import shutil

    shutil.rmtree(m / "data/replace-dir")  # replaced directory -> opaque
    (m / "data/replace-dir").mkdir()
    (m / "data/replace-dir/new.txt").write_text("new\n")
    (m / "data/sub/added.txt").write_text("added\n")
    (m / "etc/config").write_text("a=2\n")  # changed lower file (copy-up)
    os.chmod(m / "etc/config", 0o600)
    (m / "new-dir/deep/er").mkdir(parents=True)
    f = m / "new-dir/deep/er/owned.bin"
    f.write_bytes(os.urandom(70_000))
    os.chown(f, 1234, 5678)
    os.chmod(f, 0o4755)  # setuid survives
    os.setxattr(f, "user.note", b"hello")
    os.setxattr(f, "user.binary", bytes(range(256)))
    os.symlink("../data/keep.txt", m / "new-dir/rel-link")
    os.symlink("/etc/config", m / "new-dir/abs-link")
    os.link(f, m / "new-dir/hardlink.bin")
    os.mkfifo(m / "new-dir/fifo")
    sparse = m / "new-dir/sparse.img"
    with open(sparse, "wb") as s:
        s.seek(64 << 20)
        s.write(b"tail")
        s.seek(1 << 20)
        s.write(b"middle")
    (m / "empty.txt").write_bytes(b"")


def test_capture_restore_round_trip(tmp_path: Path) -> None:
    lower, up1, up2 = tmp_path / "lower", tmp_path / "upper1", tmp_path / "upper2"
    for d in (lower, up1, up2):
        d.mkdir()
    make_lower(lower)
    with overlay(lower, up1, tmp_path / "w1", tmp_path / "m1") as m:
        mutate(m)
        before = tree_listing(m)
    info = capture_writable_layer(up1, tmp_path / "out")
    assert info.whiteouts >= 2 and info.opaque_dirs == 1
    assert info.data_bytes < 2 << 20, "sparse file holes must not be stored as data"
    tar_path = verify_layer(tmp_path / "out")
    stats = apply_writable_layer(tar_path, up2)
    assert stats["whiteouts"] == info.whiteouts
    with overlay(lower, up2, tmp_path / "w2", tmp_path / "m2") as m:
        after = tree_listing(m)
    assert diff_listings(before, after) == []
    assert "data/delete-me.txt" not in after and "data/replace-dir/old.txt" not in after
    sp = up2 / "new-dir/sparse.img"
    assert sp.stat().st_size == (64 << 20) + 4 and sp.stat().st_blocks * 512 < (1 << 20)
    assert os.stat(up2 / "new-dir/hardlink.bin").st_ino == os.stat(up2 / "new-dir/deep/er/owned.bin").st_ino


def test_capture_from_mounts(tmp_path: Path) -> None:
    up = tmp_path / "up"
    up.mkdir()
    mounts = [Mount("overlay", "overlay", ("index=off", f"workdir={tmp_path}/w", f"upperdir={up}", "lowerdir=/x"))]
    assert upper_dir_of(mounts) == up
    bind = [Mount("bind", str(up), ("rw", "rbind"))]
    assert upper_dir_of(bind, parentless_bind=True) == up  # an overlay snapshotter's parentless active snapshot
    assert upper_dir_of(bind) is None  # protection: a native snapshotter's rw bind is a full copy, not a layer
    assert upper_dir_of([Mount("bind", str(up), ("ro", "rbind"))], parentless_bind=True) is None  # a view
    view = Mount("overlay", "overlay", ("lowerdir=/a:/b",))  # a read-only view: no upperdir=, skipped
    assert upper_dir_of([view, *mounts]) == up
    assert upper_dir_of([view], parentless_bind=True) is None
    assert upper_dir_of([]) is None
    # CreateTaskRequest.rootfs carries containerd.types.Mount messages: the same answer
    pb = mount_pb2.Mount(type="overlay", source="overlay", options=[f"upperdir={up}", "lowerdir=/x"])
    assert upper_dir_of([pb]) == up
    # the codec itself refuses mounts without a writable layer with a clear error, and captures nothing
    with pytest.raises(InvalidArgument, match="no writable layer"):
        capture_writable_layer([view], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_digest_mismatch_refused(tmp_path: Path) -> None:
    up = tmp_path / "up"
    up.mkdir()
    (up / "f").write_text("x")
    capture_writable_layer(up, tmp_path / "out")
    with open(tmp_path / "out" / LAYER_FILE, "r+b") as f:
        f.seek(600)
        f.write(b"Y")
    with pytest.raises(FailedPrecondition, match="digest mismatch"):
        verify_layer(tmp_path / "out")


# ------------------------------------------------------------------------------------ hostile


def _tar(entries: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for ti, data in entries:
            if data is not None:
                ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def _ti(name: str, type_: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type, ti.linkname, ti.mode = type_, linkname, 0o644
    return ti


HOSTILE: dict[str, tuple[list[tuple[tarfile.TarInfo, bytes | None]], str]] = {
    "dotdot": ([(_ti("a/../../escape.txt"), b"x")], r"'\.\.' in path"),
    "absolute": ([(_ti("/tmp/escape.txt"), b"x")], "absolute path"),
    "through-symlink": (
        [(_ti("evil", tarfile.SYMTYPE, "/"), None), (_ti("evil/tmp/escape.txt"), b"x")],
        "goes through symlink",
    ),
    "symlink-out": ([(_ti("up", tarfile.SYMTYPE, "../../../../etc"), None)], "points outside the root"),
    "hardlink-out": ([(_ti("h", tarfile.LNKTYPE, "../outside.txt"), None)], r"'\.\.' in path"),
    "hardlink-via-symlink": (
        [(_ti("s", tarfile.SYMTYPE, "/"), None), (_ti("h", tarfile.LNKTYPE, "s/etc/passwd"), None)],
        "goes through symlink",
    ),
    "hardlink-to-itself": ([(_ti("a"), b"x"), (_ti("a", tarfile.LNKTYPE, "a"), None)], "links to itself"),
    "char-device": ([(_ti("dev/null", tarfile.CHRTYPE), None)], "character device"),
    "block-device": ([(_ti("sda", tarfile.BLKTYPE), None)], "block device"),
    "long-name": ([(_ti("d/" + "n" * 300), b"x")], "longer than 255"),
    "long-path": ([(_ti("/".join(["abcdefgh"] * 600)), b"x")], "longer than 4096"),
    "overlay-xattr": ([(_ti("f"), b"x")], "not allowed"),
    "whiteout-dotdot": ([(_ti("a/.wh.."), b"")], "bad name"),
}
HOSTILE["overlay-xattr"][0][0][0].pax_headers["SCHILY.xattr.trusted.overlay.redirect"] = "/etc"


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_diff_rejected(tmp_path: Path, case: str) -> None:
    entries, message = HOSTILE[case]
    outside = tmp_path / "outside"
    outside.mkdir()
    sentinel = outside / "outside.txt"
    sentinel.write_text("untouched")
    upper = outside / "upper"  # `..` from upper lands in `outside`
    upper.mkdir()
    tar_path = tmp_path / "hostile.tar"
    tar_path.write_bytes(_tar(entries))
    before = tree_listing(tmp_path)
    with pytest.raises(LayerError, match=message):
        apply_writable_layer(tar_path, upper)
    after = tree_listing(tmp_path)
    # Nothing written anywhere outside the (to be discarded) upper dir.
    outside_changes = [line for line in diff_listings(before, after) if not line.startswith("outside/upper")]
    assert outside_changes == []
    assert sentinel.read_text() == "untouched"
    assert not Path("/tmp/escape.txt").exists()


def test_layer_cli_capture_ls_apply(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from shim.cli import main as revenant

    up = tmp_path / "up"
    (up / "d").mkdir(parents=True)
    (up / "d/f").write_text("content\n")
    os.mknod(up / "gone", 0o020000, os.makedev(0, 0))
    assert revenant(["layer", "capture", str(up), str(tmp_path / "out")]) == 0
    assert revenant(["layer", "ls", str(tmp_path / "out" / LAYER_FILE)]) == 0
    listing = capsys.readouterr().out
    assert "d/f" in listing and ".wh.gone" in listing
    assert revenant(["layer", "apply", str(tmp_path / "out" / LAYER_FILE), str(tmp_path / "new")]) == 0
    assert (tmp_path / "new/d/f").read_text() == "content\n"
    assert os.stat(tmp_path / "new/gone").st_rdev == 0
