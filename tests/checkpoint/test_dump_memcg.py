"""The dump's memory cgroup (shim.runc.memcg) on this machine's real cgroup hierarchy: a command run
through wrap() is born inside (and so are its children), the page cache it writes is charged there and
held to the limit by the kernel without an OOM kill, and close() reports the peak and removes it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from shim.runc import memcg
from shim.runc.memcg import DumpCgroup

MIB = 1 << 20


def test_a_writer_in_the_dump_cgroup_is_held_to_its_limit(tmp_path: Path) -> None:
    cg = DumpCgroup.create(64 * MIB)
    assert cg is not None, "no memory cgroup on this machine"
    path = cg.path
    # A child of the wrapped command reports its cgroup, then the command writes 4x the limit to disk.
    out = tmp_path / "big"
    script = f"cat /proc/self/cgroup; dd if=/dev/zero of={out} bs=1M count=256 status=none; sync"
    res = subprocess.run(cg.wrap(["/bin/sh", "-c", script]), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert path.name in res.stdout, res.stdout  # the child was born in the dump's cgroup
    assert out.stat().st_size == 256 * MIB
    report = cg.close()
    assert report.limit_bytes == 64 * MIB
    assert 8 * MIB < report.peak_bytes <= 64 * MIB, report  # charged there, never beyond the limit
    assert report.oom_kills == 0
    assert not path.exists(), "the dump cgroup was left behind"
    assert cg.close() is report  # idempotent


def test_memory_reclaim_cannot_free_lifts_the_limit_instead_of_killing(tmp_path: Path) -> None:
    """CRIU's own memory beyond the limit must not get it killed mid-dump: the limit goes instead."""
    cg = DumpCgroup.create(64 * MIB)
    assert cg is not None, "no memory cgroup on this machine"
    grow = "x = b'\\x01' * (160 << 20); print(len(x))"  # 160 MiB of anonymous memory, every page touched
    res = subprocess.run(cg.wrap([sys.executable, "-c", grow]), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip() == str(160 * MIB), res  # it ran to the end
    report = cg.close()
    assert report.oom_kills == 0
    if report.version == 1:
        assert report.lifted and report.as_dict()["limit_lifted"] == 1
        assert report.peak_bytes > 64 * MIB  # went on past the lifted limit
    assert not cg.path.exists()


def test_without_a_memory_controller_the_dump_runs_unbounded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(memcg, "_warned", type(memcg._warned)())
    # A cgroup root without any memory controller mounted (an empty directory stands in for one).
    assert DumpCgroup.create(64 * MIB, root=tmp_path) is None
    assert DumpCgroup.create(64 * MIB, root=tmp_path) is None
    warnings = [r for r in caplog.records if r.levelname == "WARNING" and "memory cgroup" in r.getMessage()]
    assert len(warnings) == 1, warnings  # said once, not at every dump
