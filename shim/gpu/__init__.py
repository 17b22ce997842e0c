"""GPU (CUDA) state in checkpoints, through the CUDA driver's process checkpoint API (ctypes, no CUDA SDK).

CRIU cannot dump device memory. The driver can move a process's GPU state into its host memory
(lock -> checkpoint), after which CRIU dumps it like any other memory, and put it back after a CRIU
restore (restore -> unlock). States: RUNNING -> LOCKED -> CHECKPOINTED -> LOCKED -> RUNNING.

API for the checkpoint engine (all names importable from `shim.gpu`). The engine's DumpHooks are
GpuDumpHooks (shim/gpu/hooks.py, built on what follows); the parts, for other callers:

    coord = GpuCoordinator()                      # or the module-level helpers below (one per process)
    with coord.quiesced(pids, lock_timeout_ms=10_000) as session:
        runc_checkpoint(...)                      # CRIU dump of the container, GPU memory now in host RAM
        session.after_dump(leave_running=True)    # restore + unlock every CUDA process; job goes on
        # or session.after_dump(leave_running=False) when the dump stopped the container
    metadata["gpu"] = session.metadata()          # cuda_processes, node (model/count/driver), stats

    ok = check_compatible(checkpoint_metadata["gpu"], coord.node_info())   # before runc restore
    if not ok: refuse, with ok.reason             # (coord.require_compatible() raises GpuIncompatible)
    runc_restore(...)
    coord.resume_restored(pids, expected=checkpoint_metadata["gpu"]["cuda_processes"])

    session = coord.begin(pids)                   # the same without `with`:
    try: dump() except BaseException as e: session.abort(e); raise
    session.after_dump(leave_running=...)

Guarantees:
- `pids` are the container's processes (cgroup.procs / runc ps); the CUDA ones are those with an fd or
  mapping under /dev/nvidia (REVENANT_GPU_DEVICE_PREFIX, colon-separated, overrides). A container with
  none gives an inactive session: nothing is loaded or called, CPU containers behave exactly as before.
- libcuda is loaded lazily (REVENANT_LIBCUDA, default libcuda.so.1) and cuInit(0) is called first. If it
  cannot be loaded and the container uses NVIDIA devices, quiesced() raises GpuQuiesceError before any
  dump (a dump would silently lose the GPU state).
- Every process is locked (driver timeout lock_timeout_ms; a watchdog of lock_timeout + 30 s guards
  against a driver that ignores it), then every process is checkpointed. Any failure there returns every
  process to RUNNING (restore the checkpointed, then unlock the locked; a failed restore/unlock that
  left the state unchanged is retried once; an unreadable state gets restore + unlock blind) and raises
  GpuQuiesceError
  before the body runs. If the body (the dump) raises, the same rollback runs and the body's exception
  propagates with a note; if the rollback itself fails, GpuRollbackError names each pid, the failed
  call and the state it was left in (err.rollback). A driver call that never returns is abandoned after
  its watchdog and a background thread returns the process to RUNNING once it does
  (coord.wait_for_stuck_calls()). A process that exits between discovery and its lock is dropped.
- after_dump() failures raise GpuResumeError: the checkpoint is complete, but the job's GPU could not be
  resumed. Leaving the `with` block without after_dump() resumes every live process (and logs it).
- resume_restored() finds restored processes through the driver (a checkpointed process has closed its
  /dev/nvidia* files), restores + unlocks them, and raises GpuResumeError if any fails or if their
  number differs from `expected`. A failed restore may be permanent (NVIDIA/cuda-checkpoint#44): the
  engine should then kill the restored container and fall back.
- Timings (lock/checkpoint/restore/unlock seconds, per process too) and bytes (nvidia-smi's per-process
  GPU memory when present, else the RSS growth caused by checkpoint) are in session.stats.
- check_compatible(saved, node) refuses a different GPU model or count, or a node without GPU support,
  with a clear reason; a checkpoint without GPU state is compatible with every node.

Evidence so far: CPU-side tests against a fake libcuda (tests/gpu); the real-GPU check is
tests/gpu/run_on_gpu.sh.
"""

from .coordinator import (
    GpuCoordinator,
    GpuIncompatible,
    GpuQuiesceError,
    GpuResumeError,
    GpuRollbackError,
    GpuSession,
    GpuStepError,
    StepFailure,
)
from .discovery import ProcRef, find_cuda_processes
from .driver import CudaDriver, CudaError, GpuError, GpuUnavailable, ProcessState
from .hooks import GpuDumpHooks, runc_pids
from .info import Compatibility, check_compatible, node_gpu_info

_default: GpuCoordinator | None = None


def default_coordinator() -> GpuCoordinator:
    """One coordinator per process, configured from the environment."""
    global _default
    if _default is None:
        _default = GpuCoordinator()
    return _default


def quiesced(pids, *, lock_timeout_ms: int | None = None):
    return default_coordinator().quiesced(pids, lock_timeout_ms=lock_timeout_ms)


def resume_restored(pids, *, expected: int | None = None):
    return default_coordinator().resume_restored(pids, expected=expected)


__all__ = [
    "Compatibility",
    "CudaDriver",
    "CudaError",
    "GpuCoordinator",
    "GpuDumpHooks",
    "GpuError",
    "GpuIncompatible",
    "GpuQuiesceError",
    "GpuResumeError",
    "GpuRollbackError",
    "GpuSession",
    "GpuStepError",
    "GpuUnavailable",
    "ProcRef",
    "ProcessState",
    "StepFailure",
    "check_compatible",
    "default_coordinator",
    "find_cuda_processes",
    "node_gpu_info",
    "quiesced",
    "resume_restored",
    "runc_pids",
]
