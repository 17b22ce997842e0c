"""Fixtures for the CPU-side GPU tests: a fake libcuda built with gcc, and real child processes that hold
a fake NVIDIA device file open (or mapped)."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.fakecuda import FakeCuda

HERE = Path(__file__).parent


@pytest.fixture(scope="session")
def fake_libcuda_build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.fail("gcc is needed to build the fake libcuda: apt-get install -y gcc")
    out = tmp_path_factory.mktemp("fakecuda") / "libcuda.so.1"
    subprocess.run(
        [gcc, "-shared", "-fPIC", "-O1", "-Wall", "-Werror", "-o", str(out), str(HERE / "fake_libcuda.c"), "-lpthread"],
        check=True,
    )
    return out


@pytest.fixture
def fake_cuda(fake_libcuda_build: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeCuda]:
    lib = tmp_path / "lib" / "libcuda.so.1"
    lib.parent.mkdir()
    shutil.copy(fake_libcuda_build, lib)  # a distinct path: dlopen gives this test fresh static state
    state_dir = tmp_path / "cudastate"
    state_dir.mkdir()
    device = tmp_path / "dev" / "nvidia0"
    device.parent.mkdir()
    device.write_bytes(b"\0" * 4096)
    monkeypatch.setenv("FAKE_CUDA_STATE_DIR", str(state_dir))
    monkeypatch.setenv("FAKE_CUDA_DEVICE_PREFIX", str(device.parent / "nvidia"))
    monkeypatch.setenv("FAKE_CUDA_DEVICES", "Fake GPU")
    monkeypatch.delenv("REVENANT_LIBCUDA", raising=False)
    monkeypatch.delenv("REVENANT_GPU_DEVICE_PREFIX", raising=False)
    fc = FakeCuda(lib, state_dir, device)
    try:
        yield fc
    finally:
        fc.close()
