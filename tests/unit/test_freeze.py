"""The frozen window's breakdown (shim.protect.freeze) and the direct cgroup freezer (shim.runc.freezer)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from shim.checkpoint.criu_stats import DumpStats
from shim.checkpoint.engine import CheckpointResult
from shim.protect.freeze import PARTS, freeze_breakdown
from shim.runc.freezer import CgroupFreezer, container_freezer


def dump(runc_s: float, *, frozen_us: int, memdump_us: int, memwrite_us: int, stats: bool = True) -> CheckpointResult:
    st = DumpStats(2000, frozen_us, memdump_us, memwrite_us, 10, 0, 10) if stats else None
    timings = {"hooks_before_s": 0.001, "runc_checkpoint_s": runc_s, "hooks_after_s": 0.002}
    return CheckpointResult(Path("/x"), runc_s + 0.004, st, 0, timings)


def test_parts_add_up_to_the_total() -> None:
    d = dump(1.0, frozen_us=800_000, memdump_us=700_000, memwrite_us=300_000)
    b = freeze_breakdown(total_s=1.2, pause_s=0.05, dump=d, layer_s=0.1, resume_s=0.02)
    assert set(b) == {"total_ms", *PARTS}
    assert b["criu_freezing_ms"] == 2.0
    assert b["criu_memdrain_ms"] == 400.0 and b["criu_memwrite_ms"] == 300.0  # memdump contains memwrite
    assert b["criu_frozen_other_ms"] == 100.0
    assert b["runc_own_ms"] == pytest.approx(198.0)
    assert b["hooks_ms"] == 3.0 and b["engine_other_ms"] == pytest.approx(1.0)
    assert sum(b[p] for p in PARTS) == pytest.approx(b["total_ms"])
    assert b["unaccounted_ms"] == pytest.approx(1200 - 50 - 3 - 1000 - 1 - 100 - 20)


def test_criu_claiming_more_than_runc_took_is_cut_and_never_exceeds_the_total() -> None:
    d = dump(0.5, frozen_us=900_000, memdump_us=950_000, memwrite_us=990_000)
    b = freeze_breakdown(total_s=0.6, pause_s=0.01, dump=d, layer_s=0.0, resume_s=0.0)
    assert all(v >= 0 for v in b.values()), b
    assert sum(b[p] for p in PARTS) <= b["total_ms"] + 0.01, b
    assert b["runc_own_ms"] == 0 and b["criu_freezing_ms"] + b["criu_memwrite_ms"] <= 500.0 + 0.01


def test_without_criu_stats_runc_keeps_the_time() -> None:
    b = freeze_breakdown(
        total_s=0.3,
        pause_s=0,
        dump=dump(0.25, frozen_us=0, memdump_us=0, memwrite_us=0, stats=False),
        layer_s=0,
        resume_s=0,
    )
    assert b["runc_own_ms"] == 250.0 and b["criu_memwrite_ms"] == 0


def write_state(root: Path, cid: str, paths: dict) -> None:
    (root / cid).mkdir(parents=True)
    (root / cid / "state.json").write_text(json.dumps({"id": cid, "cgroup_paths": paths}))


def test_container_freezer_refuses_paths_runc_would_not_write(tmp_path: Path) -> None:
    write_state(tmp_path, "outside", {"freezer": "/etc"})
    write_state(tmp_path, "escape", {"freezer": "/sys/fs/cgroup/freezer/../../../../etc"})
    write_state(tmp_path, "root", {"freezer": "/sys/fs/cgroup"})
    write_state(tmp_path, "none", {})
    for cid in ("outside", "escape", "root", "none", "missing", "../outside", ".."):
        assert container_freezer(str(tmp_path), cid) is None, cid
    (tmp_path / "huge").mkdir()
    (tmp_path / "huge" / "state.json").write_bytes(b" " * (5 << 20))
    assert container_freezer(str(tmp_path), "huge") is None


V1 = Path("/sys/fs/cgroup/freezer")


@pytest.mark.skipif(
    os.geteuid() != 0 or not V1.is_dir(),
    reason="needs root and a cgroup v1 freezer hierarchy at /sys/fs/cgroup/freezer (a cgroup v2-only host has none)",
)
def test_freeze_stops_the_cgroups_tasks_and_thaw_lets_them_run(tmp_path: Path) -> None:
    """A real v1 freezer cgroup (the dev VMs' hierarchy) found through a runc-like state.json."""
    ns = os.environ.get("REVENANT_TEST_NAMESPACE", "rt")
    cg = V1 / f"{ns}-freeze-{uuid.uuid4().hex[:8]}"
    cg.mkdir()
    counter = tmp_path / "counter"  # grows by a line every millisecond while the child runs
    loop = (
        f"import os, time\nfd = os.open({str(counter)!r}, os.O_WRONLY | os.O_CREAT | os.O_APPEND)\n"
        "while True:\n    os.write(fd, b'x\\n')\n    time.sleep(0.001)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", loop])

    def size() -> int:
        return counter.stat().st_size if counter.exists() else 0

    try:
        (cg / "cgroup.procs").write_text(str(child.pid))
        write_state(tmp_path / "root", "c1", {"freezer": str(cg), "": "/sys/fs/cgroup/unified"})
        freezer = container_freezer(str(tmp_path / "root"), "c1")
        assert freezer == CgroupFreezer(cg, v2=False)
        assert freezer.pids() == [child.pid]
        deadline = time.monotonic() + 30
        while size() == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        freezer.freeze()
        assert (cg / "freezer.state").read_text().strip() == "FROZEN"
        frozen_at = size()
        time.sleep(0.3)
        assert size() == frozen_at, "the task ran while its cgroup was frozen"
        freezer.thaw()
        deadline = time.monotonic() + 30
        while size() == frozen_at and time.monotonic() < deadline:
            time.sleep(0.01)
        assert size() > frozen_at, "the task did not run again after the thaw"
    finally:
        (cg / "freezer.state").write_text("THAWED")
        child.kill()
        child.wait()
        for _ in range(100):
            try:
                cg.rmdir()
                break
            except OSError:
                time.sleep(0.05)


@pytest.mark.parametrize("durable", [True, False])
def test_layer_hash_taken_while_writing_matches_the_tar(tmp_path: Path, durable: bool) -> None:
    """The capture hashes the tar as it writes it (no second read inside the frozen window)."""
    from shim.layer import LAYER_FILE, capture_writable_layer, sha256_file

    upper = tmp_path / "upper"
    (upper / "data").mkdir(parents=True)
    (upper / "data" / "big").write_bytes(os.urandom(3 << 20))
    (upper / "data" / "small").write_text("x")
    info = capture_writable_layer(upper, tmp_path / f"out-{durable}", durable=durable)
    tar = tmp_path / f"out-{durable}" / LAYER_FILE
    assert info.sha256 == sha256_file(tar) and info.size == tar.stat().st_size
    assert info.entries == 3 and not (tmp_path / f"out-{durable}" / "rootfs-diff.tar.part").exists()
