"""Finding the overlay dockerd mounted at a container's root in /proc/self/mountinfo."""

from __future__ import annotations

import pytest

from shim.task.mounts import overlay_at, overlay_remount_data, parse_mountinfo_line

DATA = "/var/lib/docker/overlay2"


def line(mount_id: int, point: str, upper: str, lower: str = f"{DATA}/l/AAA") -> str:
    return (
        f"{mount_id} 50 0:{mount_id} / {point} rw,relatime shared:4 - overlay overlay "
        f"rw,lowerdir={lower},upperdir={upper},workdir={upper[: -len('diff')]}work"
    )


def test_escaped_paths_and_options_are_unescaped_after_splitting() -> None:
    m = parse_mountinfo_line(line(54, "/tmp/my\\040dir/merged", "/tmp/my\\040dir/a\\054b/diff"))
    assert m.mount_point == "/tmp/my dir/merged"
    assert m.fstype == "overlay" and m.source == "overlay"
    assert m.super_option("upperdir") == "/tmp/my dir/a,b/diff"  # an escaped comma is part of the value
    assert m.mount_options == ("rw", "relatime")


def test_line_without_optional_fields() -> None:
    m = parse_mountinfo_line("60 1 0:5 / /x rw - tmpfs tmpfs rw,size=10k")
    assert (m.mount_point, m.fstype, m.super_options) == ("/x", "tmpfs", ("rw", "size=10k"))


def test_overlay_at_finds_the_topmost_mount_and_its_upper_dir() -> None:
    infos = [
        parse_mountinfo_line(line(54, f"{DATA}/c1/merged", f"{DATA}/c1/diff")),
        parse_mountinfo_line(line(55, f"{DATA}/c2/merged", f"{DATA}/c2/diff")),
    ]
    m = overlay_at(f"{DATA}/c2/merged", infos)
    assert m is not None and m.super_option("upperdir") == f"{DATA}/c2/diff"
    assert overlay_at(f"{DATA}/c3/merged", infos) is None
    # a tmpfs mounted over the overlay: the rootfs the container sees is no overlay
    infos.append(parse_mountinfo_line(f"60 55 0:60 / {DATA}/c2/merged rw - tmpfs tmpfs rw"))
    assert overlay_at(f"{DATA}/c2/merged", infos) is None


def test_an_upper_dir_another_overlay_uses_is_refused() -> None:
    infos = [
        parse_mountinfo_line(line(54, f"{DATA}/c1/merged", f"{DATA}/c1/diff")),
        parse_mountinfo_line(line(55, "/elsewhere", f"{DATA}/c1/diff")),
    ]
    with pytest.raises(ValueError, match="also the upper dir of"):
        overlay_at(f"{DATA}/c1/merged", infos)


def test_read_only_overlay_has_no_writable_layer() -> None:
    infos = [parse_mountinfo_line("54 50 0:54 / /ro ro - overlay overlay ro,lowerdir=/a:/b")]
    assert overlay_at("/ro", infos) is None


def test_an_overlay_whose_paths_hold_separators_is_not_remounted() -> None:
    m = parse_mountinfo_line(line(54, "/m", f"{DATA}/a\\054b/diff"))
    with pytest.raises(ValueError, match="holds a separator"):
        overlay_remount_data(m)
    ok = parse_mountinfo_line(line(55, "/n", f"{DATA}/c/diff"))
    assert overlay_remount_data(ok) == f"lowerdir={DATA}/l/AAA,upperdir={DATA}/c/diff,workdir={DATA}/c/work"
