"""`revenant gpu info|state|check` against the fake libcuda (CPU-only evidence)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from harness.fakecuda import FakeCuda


def revenant(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    code = "import sys; from shim.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=60)


def test_gpu_cli(fake_cuda: FakeCuda, tmp_path: Path) -> None:
    env = dict(
        os.environ,
        REVENANT_LIBCUDA=str(fake_cuda.lib),
        REVENANT_GPU_DEVICE_PREFIX=fake_cuda.prefix,
        FAKE_CUDA_DEVICES="NVIDIA H100 80GB HBM3",
    )
    info = json.loads(revenant("gpu", "info", env=env).stdout)
    assert info["available"] and info["models"] == ["NVIDIA H100 80GB HBM3"]

    p, plain = fake_cuda.spawn("fd"), fake_cuda.spawn("plain")
    out = revenant("gpu", "state", str(p.pid), str(plain.pid), env=env).stdout.splitlines()
    assert out == [f"{p.pid}\tcuda\tRUNNING", f"{plain.pid}\t-\tCUDA_ERROR_INVALID_VALUE"]

    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({"gpu": {"cuda_processes": 1, "node": {**info, "models": ["NVIDIA H200"]}}}))
    res = revenant("gpu", "check", str(meta), env=env)
    assert res.returncode == 1 and res.stdout.startswith("NOT compatible: GPU model differs")
    meta.write_text(json.dumps({"gpu": {"cuda_processes": 1, "node": info}}))
    assert revenant("gpu", "check", str(meta), env=env).returncode == 0
