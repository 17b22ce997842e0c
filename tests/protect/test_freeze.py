"""The frozen window of a protected checkpoint: the writable layer and the memory image describe the
same instant, and every millisecond of the window is accounted for in the checkpoint's record.

Real containerd nodes, the revenant shim, runc and CRIU, a file:// store. No timing assertions.
"""

from __future__ import annotations

import json
import subprocess
import uuid
from pathlib import Path

import pytest

from harness.containerd import VENV_BIN, ContainerdNode
from harness.protect import Job, destroy_node, registry_record, run_job, shim_log, store_checkpoints, task_status
from harness.wait import wait_until
from shim.protect.freeze import PARTS

pytestmark = pytest.mark.timeout(600)

COUNT_LOG = "/data/count.log"
# The shell holds a counter in memory and appends each value to a file in its writable layer, as fast
# as it can. Restored from a checkpoint, it appends the value after the one its memory holds: the
# file continues without a gap or a repeat only if the layer was captured at the instant the memory
# was dumped. A layer captured later holds values the restored shell writes again (a repeat); one
# captured earlier lacks values the shell had already written (a gap).
COUNTER_JOB = f"mkdir -p /data && i=0 && while :; do i=$((i+1)); echo $i >> {COUNT_LOG}; done"


def revenant(*args: str) -> dict:
    out = subprocess.run([str(VENV_BIN / "revenant"), *args], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr or out.stdout
    return json.loads(out.stdout)


def counts(node: ContainerdNode, cid: str) -> list[int]:
    """The values in the job's log; a last line caught mid-write is left out."""
    try:
        lines = (node.rootfs(cid) / COUNT_LOG.lstrip("/")).read_text().split("\n")
    except OSError:
        return []
    return [int(v) for v in lines[:-1] if v]


def assert_no_gap_or_repeat(values: list[int], where: str) -> None:
    assert values, f"no values on {where}"
    bad = next((i for i in range(1, len(values)) if values[i] != values[i - 1] + 1), None)
    assert bad is None, f"{where}: the count jumps from {values[bad - 1]} to {values[bad]} at line {bad + 1}"


def test_layer_and_memory_describe_the_same_instant(node_factory, test_images, tmp_path: Path) -> None:
    a, b = node_factory("a"), node_factory("b")
    image_a, image_b = a.import_image(test_images.memjob), b.import_image(test_images.memjob)
    job = Job("job", f"freeze/{uuid.uuid4().hex[:10]}/main", f"file://{tmp_path / 'store'}", interval="off")
    command = ["sh", "-c", COUNTER_JOB]
    run_job(a, image_a, job, command=command)
    wait_until(lambda: len(counts(a, job.cid)) > 1000, 60, "the counter job running on A")

    result = revenant("checkpoint", job.cid, "--run-dir", str(a.revenant_run_dir), "--json")
    assert result["status"] == "ok", result
    assert task_status(a, job.cid) == "RUNNING"
    after = len(counts(a, job.cid))
    wait_until(lambda: len(counts(a, job.cid)) > after + 1000, 60, "the job running on after the checkpoint")
    assert_no_gap_or_repeat(counts(a, job.cid), "A")
    destroy_node(a)

    run_job(b, image_b, job, command=command)
    wait_until(lambda: task_status(b, job.cid) == "RUNNING", 60, "the job restored on B")
    rec = registry_record(b, job.cid)
    assert rec is not None and rec["restored_from"] == result["seq"], rec
    restored = len(counts(b, job.cid))
    wait_until(lambda: len(counts(b, job.cid)) > restored + 1000, 60, "the restored job counting on B")
    assert_no_gap_or_repeat(counts(b, job.cid), "B (A's checkpointed log, then the restored job's values)")


def test_freeze_breakdown_is_recorded(containerd_node: ContainerdNode, test_images, tmp_path: Path) -> None:
    node = containerd_node
    image = node.import_image(test_images.memjob)
    job = Job("job", f"freeze/{uuid.uuid4().hex[:10]}/main", f"file://{tmp_path / 'store'}", mib=32, interval="off")
    run_job(node, image, job)
    wait_until(lambda: (node.rootfs(job.cid) / "data/marker").exists(), 60, "the job started")

    result = revenant("checkpoint", job.cid, "--run-dir", str(node.revenant_run_dir), "--json")
    assert result["status"] == "ok", result
    freeze = result["freeze"]
    assert set(freeze) == {"total_ms", *PARTS}, freeze
    assert all(v >= 0 for v in freeze.values()), freeze
    assert sum(freeze[p] for p in PARTS) <= freeze["total_ms"] + 0.01, freeze
    assert abs(freeze["total_ms"] - result["freeze_s"] * 1000) < 1, (freeze, result["freeze_s"])
    # The parts are measured, not made up: CRIU's phases come from its stats-dump, the layer was captured.
    assert freeze["criu_memdrain_ms"] > 0 and freeze["criu_memwrite_ms"] > 0, freeze
    assert freeze["layer_ms"] > 0 and freeze["runc_own_ms"] > 0, freeze

    (info,) = store_checkpoints(job.store, job.key)
    assert info.metadata["freeze"] == freeze, info.metadata.get("freeze")
    wait_until(lambda: f"freeze of {node.namespace}/{job.cid}" in shim_log(node), 30, "the breakdown's log line")
    line = next(ln for ln in shim_log(node).splitlines() if f"freeze of {node.namespace}/{job.cid}" in ln)
    assert f"total_ms={freeze['total_ms']:.1f}" in line and "criu_memwrite_ms=" in line, line
    # The freeze went through the cgroup freezer runc's state names, not the `runc pause` fallback.
    assert "using runc pause" not in shim_log(node)
