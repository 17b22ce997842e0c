"""CPU rehearsal of the GPU check (tests/gpu/gpu_check.py, driven by run_on_gpu.sh on a GPU machine): the
same controller, with the fake libcuda and a CPU stand-in job that holds a fake device file, through a
real CRIU `dump --leave-running`, SIGKILL, `restore --restore-detached`, and the exact trajectory/checksum
comparison. It proves the controller's process handling and CRIU usage, not anything about GPUs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness.fakecuda import FakeCuda
from harness.tools import require

HERE = Path(__file__).parent
REPO = HERE.parent.parent


@pytest.mark.timeout(300)
def test_gpu_check_controller_dry_run(fake_cuda: FakeCuda, tmp_path: Path) -> None:
    criu = require("criu", "criu")
    carried = HERE / ".criu" / "criu"  # what the GPU machine uses, when fetch-criu.sh has been run
    env = dict(
        os.environ,
        REVENANT_LIBCUDA=str(fake_cuda.lib),
        REVENANT_GPU_DEVICE_PREFIX=fake_cuda.prefix,
        STANDIN_DEVICE=str(fake_cuda.device),
        PYTHONPATH=f"{REPO}:{REPO / 'tests'}:{HERE}",  # as run_on_gpu.sh sets it
    )
    out = tmp_path / "out"
    res = subprocess.run(
        [
            sys.executable,
            str(HERE / "gpu_check.py"),
            "--work",
            str(tmp_path / "work"),
            "--out",
            str(out),
            "--criu",
            str(carried if carried.exists() else criu),
            "--job",
            "standin_job.py",
            "--dry-run",
            "--steps",
            "160",
            "--checkpoint-at",
            "50",
            "--run-on",
            "20",
            "--gib",
            "0.03125",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=280,
    )
    result = json.loads((out / "gpu_check.json").read_text())
    assert res.returncode == 0 and result["ok"], res.stdout + res.stderr
    assert result["checksum"] == result["reference_checksum"]
    assert result["replayed_steps"], "the restore should replay the steps made after the dump"
    assert result["checkpoint"]["gpu"]["cuda_processes"] == 1
    assert result["restore"]["gpu"]["cuda_processes"] == 1
    pid = result["checkpoint"]["gpu"]["pids"][0]
    assert fake_cuda.state(pid) == "running"  # left RUNNING before it exited
    assert [c.split()[0] for c in fake_cuda.calls() if c.split()[1:2] == [str(pid)]] == [
        "cuCheckpointProcessLock",
        "cuCheckpointProcessCheckpoint",
        "cuCheckpointProcessRestore",
        "cuCheckpointProcessUnlock",  # after the leave-running dump
        "cuCheckpointProcessRestore",
        "cuCheckpointProcessUnlock",  # after criu restore
    ]
