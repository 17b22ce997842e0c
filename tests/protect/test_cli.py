"""`revenant ls`, `revenant checkpoint` and `revenant history` against a real protected container."""

from __future__ import annotations

import json
import subprocess
import uuid
from pathlib import Path

from harness.containerd import VENV_BIN, ContainerdNode
from harness.memjob import wait_for_step
from harness.protect import Job, job_log, run_job, task_status, wait_stopped


def revenant(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(VENV_BIN / "revenant"), *args], capture_output=True, text=True, timeout=300)


def test_ls_checkpoint_history(containerd_node: ContainerdNode, test_images, tmp_path: Path) -> None:
    node = containerd_node
    image = node.import_image(test_images.memjob)
    job = Job("job", f"cli/{uuid.uuid4().hex[:8]}/main", f"file://{tmp_path / 'store'}", mib=16, interval="off")
    run_job(node, image, job)
    wait_for_step(job_log(node, job.cid), 3)
    run_dir = str(node.revenant_run_dir)

    ls = revenant("ls", "--run-dir", run_dir)
    assert ls.returncode == 0, ls.stderr
    assert job.key in ls.stdout and "never" in ls.stdout and "off" in ls.stdout, ls.stdout

    ck = revenant("checkpoint", job.cid, "--run-dir", run_dir, "--json")
    assert ck.returncode == 0, ck.stderr
    result = json.loads(ck.stdout)
    assert result["status"] == "ok" and result["seq"] == 1 and result["bytes_uploaded"] > 0, result
    assert task_status(node, job.cid) == "RUNNING"

    (rec,) = json.loads(revenant("ls", "--run-dir", run_dir, "--json").stdout)
    assert rec["key"] == job.key and rec["last_checkpoint"]["seq"] == 1, rec
    assert "#1" in revenant("ls", "--run-dir", run_dir).stdout

    # A CRIU dump and upload take far longer than 50 ms: at least one progress line (phase, elapsed) is due.
    ck = revenant(
        "checkpoint", job.cid, "--namespace", node.namespace, "--run-dir", run_dir, "--progress-interval", "0.05"
    )
    assert ck.returncode == 0 and "seq 2" in ck.stdout, (ck.stdout, ck.stderr)
    assert 'progress label=checkpoint phase="shim checkpointing" elapsed_s=' in ck.stderr, ck.stderr

    hist = revenant("history", job.key, "--store", job.store, "--json")
    assert hist.returncode == 0, hist.stderr
    rows = json.loads(hist.stdout)
    assert [r["seq"] for r in rows] == [1, 2] and all(r["reason"] == "revenant checkpoint" for r in rows), rows
    text = revenant("history", job.key, "--store", job.store).stdout
    assert "SEQ" in text and "revenant checkpoint" in text, text

    missing = revenant("checkpoint", "nosuch", "--run-dir", run_dir)
    assert missing.returncode == 1 and "not a protected container" in missing.stderr, missing.stderr

    final = revenant("checkpoint", job.cid, "--exit", "--run-dir", run_dir, "--json")
    assert final.returncode == 0 and json.loads(final.stdout)["seq"] == 3, final.stdout
    wait_stopped(node, job.cid)
