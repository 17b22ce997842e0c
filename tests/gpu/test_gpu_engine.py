"""The checkpoint engine (real runc + CRIU) with GpuDumpHooks, on a container whose process holds a fake
NVIDIA device (a file bind-mounted at /dev/nvidia0) and the fake libcuda standing in for the driver.
CPU-only evidence that the hooks sit at the right places around `runc checkpoint`; no GPU is involved.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from harness.fakecuda import FakeCuda
from harness.images import extract_rootfs
from harness.tools import require
from harness.wait import wait_until
from shim.checkpoint import CheckpointEngine, CheckpointError, CheckpointOptions
from shim.gpu import GpuDumpHooks, runc_pids
from shim.runc.driver import Runc

pytestmark = pytest.mark.timeout(300)


class GpuBundle:
    def __init__(self, base: Path, rootfs_archive: Path, runc: str, device: Path) -> None:
        self.dir, self.root, self.runc = base / "bundle", base / "runc", runc
        extract_rootfs(rootfs_archive, self.dir / "rootfs")
        subprocess.run([runc, "spec", "--bundle", str(self.dir)], check=True)
        config = json.loads((self.dir / "config.json").read_text())
        config["process"]["terminal"] = False
        # sh keeps the "device" open on fd 3; its sleep child does not (3>&-).
        config["process"]["args"] = ["/bin/sh", "-c", "exec 3<>/dev/nvidia0; while :; do sleep 1000 3>&-; done"]
        config["root"]["readonly"] = False
        config["mounts"].append(
            {"destination": "/dev/nvidia0", "type": "bind", "source": str(device), "options": ["bind", "rw"]}
        )
        (self.dir / "config.json").write_text(json.dumps(config))

    def runc_cmd(self, *args: str) -> list[str]:
        return [self.runc, "--root", str(self.root), *args]

    def run(self, cid: str) -> None:
        subprocess.run(
            self.runc_cmd("run", "-d", "--bundle", str(self.dir), cid),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            check=True,
        )

    def status(self, cid: str) -> str | None:
        res = subprocess.run(self.runc_cmd("state", cid), capture_output=True, text=True)
        return json.loads(res.stdout)["status"] if res.returncode == 0 else None

    def destroy(self) -> None:
        res = subprocess.run(self.runc_cmd("list", "-q"), capture_output=True, text=True)
        for cid in res.stdout.split():
            subprocess.run(self.runc_cmd("delete", "-f", cid), capture_output=True)


@pytest.fixture
def gpu_bundle(tmp_path: Path, test_images, fake_cuda: FakeCuda, monkeypatch: pytest.MonkeyPatch):
    require("criu", "criu (>= 4, see packaging/install-deps.sh)")
    # Inside the container the file is /dev/nvidia0, and that is the path the host sees in /proc/<pid>/fd.
    monkeypatch.setenv("FAKE_CUDA_DEVICE_PREFIX", "/dev/nvidia")
    b = GpuBundle(tmp_path, test_images.busybox, require("runc", "runc"), fake_cuda.device)
    yield b
    b.destroy()


def test_engine_with_gpu_hooks(gpu_bundle: GpuBundle, fake_cuda: FakeCuda, tmp_path: Path) -> None:
    pids_of = runc_pids(gpu_bundle.runc, gpu_bundle.root)
    hooks = GpuDumpHooks(pids_of, fake_cuda.coordinator(device_prefixes=("/dev/nvidia",)))
    engine = CheckpointEngine(hooks=hooks)
    driver = Runc(root=str(gpu_bundle.root), log_path=str(tmp_path / "runc.log"), binary=gpu_bundle.runc)
    gpu_bundle.run("job")
    pids = wait_until(lambda: found if len(found := pids_of("job")) == 2 else None, 30, "sh and its sleep")
    cuda = [p.pid for p in hooks.coordinator.cuda_processes(pids)]
    assert len(cuda) == 1, "only sh holds the device"
    (sh,) = cuda

    engine.checkpoint(driver, "job", tmp_path / "image", CheckpointOptions())  # leave running
    assert gpu_bundle.status("job") == "running"
    assert [
        c.split()[0].removeprefix("cuCheckpointProcess")
        for c in fake_cuda.calls()
        if c.startswith("cuCheckpointProcess")
    ] == ["Lock", "Checkpoint", "Restore", "Unlock"]
    assert fake_cuda.state(sh) == "running"
    meta = hooks.take_metadata("job")
    assert meta is not None and meta["pids"] == [sh] and meta["cuda_processes"] == 1

    # A dump that fails after the GPU was quiesced: the job must be RUNNING again.
    calls_before = len(fake_cuda.calls())
    with pytest.raises(CheckpointError):  # runc refuses an unknown namespace after before_dump ran
        engine.checkpoint(driver, "job", tmp_path / "image2", CheckpointOptions(empty_namespaces=("bogus",)))
    assert [
        c.split()[0].removeprefix("cuCheckpointProcess")
        for c in fake_cuda.calls()[calls_before:]
        if c.startswith("cuCheckpointProcess")
    ] == ["Lock", "Checkpoint", "Restore", "Unlock"]
    assert fake_cuda.state(sh) == "running"
    assert gpu_bundle.status("job") == "running"
