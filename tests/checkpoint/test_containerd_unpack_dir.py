"""The shim removes containerd's unpacked copy of a checkpoint image once the task holds its own link of
the images, and nothing else: containerd (1.6-2.x) never removes that `ctrd-checkpointN` directory."""

from pathlib import Path

import pytest

from shim.task.checkpoint_backend import link_or_copy_tree, remove_containerd_unpack_dir


@pytest.fixture
def xdg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    run = tmp_path / "xdg"
    run.mkdir()
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(run))
    return run


def _images(path: Path) -> Path:
    path.mkdir()
    (path / "inventory.img").write_bytes(b"inv")
    (path / "pages-1.img").write_bytes(b"p" * 8192)
    return path


def test_containerd_copy_removed_after_linking(xdg: Path, tmp_path: Path) -> None:
    source = _images(xdg / "ctrd-checkpoint1234")
    bundle_copy = tmp_path / "bundle-checkpoint"
    link_or_copy_tree(source, bundle_copy)
    assert remove_containerd_unpack_dir(source)
    assert not source.exists()
    assert (bundle_copy / "pages-1.img").read_bytes() == b"p" * 8192  # the link keeps the data


@pytest.mark.parametrize("name", ["ctrd-checkpoint", "ctrd-checkpoint12x", "my-checkpoint1", "ctrd-checkpoint1.d"])
def test_other_names_left_alone(xdg: Path, name: str) -> None:
    source = _images(xdg / name)
    assert not remove_containerd_unpack_dir(source)
    assert (source / "inventory.img").exists()


def test_outside_containerd_temp_dir_left_alone(xdg: Path, tmp_path: Path) -> None:
    source = _images(tmp_path / "elsewhere")
    nested = _images(source / "ctrd-checkpoint77")
    assert not remove_containerd_unpack_dir(nested)
    assert (nested / "inventory.img").exists()


def test_symlink_left_alone(xdg: Path, tmp_path: Path) -> None:
    target = _images(tmp_path / "users-images")
    link = xdg / "ctrd-checkpoint55"
    link.symlink_to(target)
    assert not remove_containerd_unpack_dir(link)
    assert link.is_symlink() and (target / "inventory.img").exists()
