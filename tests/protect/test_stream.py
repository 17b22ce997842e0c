"""The streaming dump against real containerd, runc, CRIU and the shim (shim.protect.streaming):
a job larger than the node's memory limit checkpoints and restores byte-identically, and a dump
killed mid-way leaves no checkpoint and no staged files behind."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import uuid
from pathlib import Path

import psutil
import pytest

from harness.containerd import VENV_BIN, ContainerdNode
from harness.memcg import MemoryCgroup
from harness.memjob import assert_continuous, read_steps, wait_for_step
from harness.protect import Job, destroy_node, job_log, run_job, store_checkpoints, task_status
from harness.wait import wait_until
from shim.protect.checkpointer import DUMP_CGROUP_SLACK

from .test_protect import Cluster, cluster  # noqa: F401  (the two-node fixture)

pytestmark = pytest.mark.timeout(900)
MIB = 1 << 20
BUDGET_MIB = 32


def revenant(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(VENV_BIN / "revenant"), *args], capture_output=True, text=True, timeout=600)


def stream_config(*nodes: ContainerdNode) -> None:
    for node in nodes:
        node.write_revenant_config(extra=f"stream_budget_mib = {BUDGET_MIB}")


def staged_entries(node: ContainerdNode) -> list[str]:
    return sorted(os.listdir(node.revenant_scratch)) if node.revenant_scratch.exists() else []


def test_a_job_larger_than_the_memory_limit_checkpoints_and_restores(cluster: Cluster, tmp_path: Path) -> None:  # noqa: F811
    stream_config(cluster.a, cluster.b)
    # Node A's containerd and all it starts from now on (the shim, runc, CRIU) under a limit that the
    # job's dump exceeds twice over: a dump staged whole in tmpfs would be killed by the OOM killer.
    job = Job("job", f"test/{uuid.uuid4().hex[:10]}/main", f"file://{tmp_path / 'store'}", mib=768, interval="off")
    cg = MemoryCgroup(f"rt-stream-{uuid.uuid4().hex[:8]}", limit_bytes=384 * MIB)
    try:
        cg.add(cluster.a._proc.pid)  # type: ignore[union-attr]
        run_job(cluster.a, cluster.image_a, job)
        log_a = job_log(cluster.a, job.cid)
        wait_for_step(log_a, 3, timeout=300)
        ck = revenant("checkpoint", job.cid, "--run-dir", str(cluster.a.revenant_run_dir), "--json")
        assert ck.returncode == 0, ck.stderr
        result = json.loads(ck.stdout)
        assert result["status"] == "ok" and result["seq"] == 1, result
        assert cg.oom_kills() == 0  # (its charge peaks at the limit: clean page cache fills it, reclaimably)
        assert staged_entries(cluster.a) == [], "the staged dump was left behind"
        (info,) = store_checkpoints(job.store, job.key)
        assert info.bytes_read >= 768 * MIB, info  # the whole job went through the limited node
        # CRIU ran in the dump's own memory cgroup (budget + slack), charged there up to its limit and
        # never beyond, without an OOM kill: its page cache was bounded to the budget by the kernel.
        memcg = info.metadata["dump_memcg"]
        assert memcg["limit_bytes"] == (BUDGET_MIB << 20) + DUMP_CGROUP_SLACK, memcg
        assert 16 * MIB < memcg["peak_bytes"] <= memcg["limit_bytes"], memcg
        assert memcg["oom_kills"] == 0, memcg
        assert not [p for p in cg.path.iterdir() if p.name.startswith("revenant-dump-")], "dump cgroup left"
    finally:
        destroy_node(cluster.a)
        cg.remove()

    steps_b = cluster.resume_on_b(job, timeout=300)
    assert_continuous(steps_b)
    cluster.check_memory(job, steps_b)  # every page came back


def _criu_of(node: ContainerdNode) -> psutil.Process | None:
    """The CRIU process writing into this node's scratch dir (runc runs it as `criu swrk`)."""
    scratch = str(node.revenant_scratch)
    for p in psutil.process_iter(["name"]):
        if p.info["name"] != "criu":
            continue
        with contextlib.suppress(OSError):
            fds = os.listdir(f"/proc/{p.pid}/fd")
            for fd in fds:
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{p.pid}/fd/{fd}").startswith(scratch):
                        return p
    return None


def _pages_staged(node: ContainerdNode) -> int:
    total = 0
    for path in node.revenant_scratch.rglob("pages-*.img"):
        with contextlib.suppress(OSError):
            total += path.stat().st_size
    return total


def test_a_dump_killed_midway_leaves_no_checkpoint_and_no_staged_files(
    containerd_node: ContainerdNode, test_images, tmp_path: Path
) -> None:
    node = containerd_node
    stream_config(node)
    image = node.import_image(test_images.memjob)
    job = Job("job", f"test/{uuid.uuid4().hex[:10]}/main", f"file://{tmp_path / 'store'}", mib=512, interval="off")
    run_job(node, image, job)
    log = job_log(node, job.cid)
    wait_for_step(log, 3, timeout=300)
    run_dir = str(node.revenant_run_dir)
    first = revenant("checkpoint", job.cid, "--run-dir", run_dir, "--json")
    assert first.returncode == 0, first.stderr

    ck = subprocess.Popen(
        [str(VENV_BIN / "revenant"), "checkpoint", job.cid, "--run-dir", run_dir, "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # Kill CRIU once it has written part of the page image (the put is consuming it by then).
        wait_until(lambda: _pages_staged(node) >= 32 * MIB, 300, "CRIU writing the page image")
        criu = _criu_of(node)
        assert criu is not None, "no CRIU dump running"
        os.kill(criu.pid, signal.SIGKILL)
        out, _err = ck.communicate(timeout=600)
    finally:
        if ck.poll() is None:
            ck.kill()
            ck.wait()
    assert ck.returncode != 0, out
    assert [c.seq for c in store_checkpoints(job.store, job.key)] == [1], "a failed dump became visible"
    assert staged_entries(node) == [], "the killed dump's files were left behind"
    assert task_status(node, job.cid) == "RUNNING"
    wait_for_step(log, read_steps(log)[-1].n + 3)  # thawed: it runs on

    again = revenant("checkpoint", job.cid, "--run-dir", run_dir, "--json")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["seq"] == 2
