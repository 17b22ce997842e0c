"""GPU facts of a node for checkpoint metadata, and the check that refuses a restore onto different GPUs."""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import subprocess
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .driver import CudaDriver, CudaError

log = logging.getLogger(__name__)

LIBNVML_ENV = "REVENANT_LIBNVML"
NVIDIA_SMI_ENV = "REVENANT_NVIDIA_SMI"


def node_gpu_info(driver: CudaDriver | None, unavailable_reason: str | None = None) -> dict[str, Any]:
    """{available, reason, driver_api_version, driver_version, count, models, devices[]} of this node."""
    if driver is None:
        return {
            "available": False,
            "reason": unavailable_reason or "no GPU support",
            "count": 0,
            "models": [],
            "devices": [],
            "driver_api_version": None,
            "driver_version": None,
        }
    try:
        devices = driver.devices()
    except CudaError as e:
        return {
            "available": False,
            "reason": f"cannot list devices: {e}",
            "count": 0,
            "models": [],
            "devices": [],
            "driver_api_version": driver.driver_version(),
            "driver_version": None,
        }
    return {
        "available": True,
        "reason": None,
        "libcuda": driver.path,
        "driver_api_version": driver.driver_version(),  # e.g. 13000 for CUDA 13.0
        "driver_version": kernel_driver_version(),  # e.g. "580.159.04", None without NVML/nvidia-smi
        "count": len(devices),
        "models": sorted(d.name for d in devices),
        "devices": [
            {"index": d.index, "name": d.name, "uuid": d.uuid, "total_memory_bytes": d.total_memory_bytes}
            for d in devices
        ],
    }


def kernel_driver_version() -> str | None:
    """The NVIDIA kernel driver version, from NVML when loadable, else nvidia-smi, else None."""
    try:
        nvml = ctypes.CDLL(os.environ.get(LIBNVML_ENV) or "libnvidia-ml.so.1")
        if nvml.nvmlInit_v2() == 0:
            try:
                buf = ctypes.create_string_buffer(96)
                if nvml.nvmlSystemGetDriverVersion(buf, 96) == 0:
                    return buf.value.decode()
            finally:
                nvml.nvmlShutdown()
    except (OSError, AttributeError):
        pass
    out = _nvidia_smi("--query-gpu=driver_version", "--format=csv,noheader")
    return out.splitlines()[0].strip() if out else None


def gpu_memory_by_pid() -> dict[int, int]:
    """Bytes of GPU memory each compute process holds, per nvidia-smi; {} when nvidia-smi is absent."""
    out = _nvidia_smi("--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits")
    used: dict[int, int] = {}
    for line in (out or "").splitlines():
        try:
            pid_s, mib_s = (x.strip() for x in line.split(","))
            used[int(pid_s)] = used.get(int(pid_s), 0) + int(mib_s) * 1024 * 1024
        except ValueError:
            continue
    return used


def _nvidia_smi(*args: str) -> str | None:
    exe = os.environ.get(NVIDIA_SMI_ENV) or shutil.which("nvidia-smi")
    if not exe:
        return None
    try:
        r = subprocess.run([exe, *args], capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        log.warning("nvidia-smi %s failed: %s", " ".join(args), e)
        return None
    return r.stdout if r.returncode == 0 else None


@dataclass(frozen=True)
class Compatibility:
    ok: bool
    reason: str

    def __bool__(self) -> bool:
        return self.ok


def check_compatible(saved: Mapping[str, Any] | None, node: Mapping[str, Any]) -> Compatibility:
    """May a checkpoint whose GPU metadata is `saved` (GpuSession.metadata()) be restored on `node`?

    The CUDA checkpoint restores device memory onto the same kind and number of devices (no remapping is
    requested), so a different GPU model or count is refused, with the reason.
    """
    if not saved or not saved.get("cuda_processes"):
        return Compatibility(True, "the checkpoint holds no GPU state")
    had = saved.get("node") or {}
    want_models = Counter(had.get("models") or [])
    want_count = int(had.get("count") or 0)
    if not node.get("available"):
        return Compatibility(
            False,
            f"the checkpoint holds GPU state of {saved['cuda_processes']} CUDA process(es) "
            f"on {_describe(want_count, want_models)}, but this node has no GPU support: "
            f"{node.get('reason')}",
        )
    have_models = Counter(node.get("models") or [])
    have_count = int(node.get("count") or 0)
    seen = (
        f"the checkpoint was taken on {_describe(want_count, want_models)}, "
        f"this node has {_describe(have_count, have_models)}"
    )
    if have_count != want_count:
        return Compatibility(False, f"GPU count differs: {seen}")
    if have_models != want_models:
        return Compatibility(False, f"GPU model differs: {seen}")
    return Compatibility(True, f"same GPUs: {_describe(have_count, have_models)}")


def _describe(count: int, models: Counter[str]) -> str:
    if not count:
        return "no GPU"
    return ", ".join(f"{n} x {m}" for m, n in sorted(models.items())) or f"{count} GPU(s)"
