"""ctypes bindings to libcuda's process checkpoint API (driver API 12.8+, seen in driver 580 / CUDA 13.0).

Only the standard library is used so this module also runs under the GPU machine's own Python.

Signatures and argument structs, as in cuda.h (each args struct is 64 bytes; reserved fields must be zero):
    CUresult cuCheckpointProcessGetState(int pid, CUprocessState *state);
    CUresult cuCheckpointProcessLock(int pid, CUcheckpointLockArgs *args);
        {unsigned int timeoutMs; unsigned int reserved0; cuuint64_t reserved1[7]}
    CUresult cuCheckpointProcessCheckpoint(int pid, CUcheckpointCheckpointArgs *args);
        {cuuint64_t reserved[8]}
    CUresult cuCheckpointProcessRestore(int pid, CUcheckpointRestoreArgs *args);
        {CUcheckpointGpuPair *gpuPairs; unsigned int gpuPairsCount; char reserved[52 - sizeof(ptr)];
         cuuint64_t reserved1}
    CUresult cuCheckpointProcessUnlock(int pid, CUcheckpointUnlockArgs *args);
        {cuuint64_t reserved[8]}
cuInit(0) must succeed before any of them (else CUDA_ERROR_NOT_INITIALIZED).
"""

from __future__ import annotations

import ctypes
import enum
import logging
import os
from dataclasses import dataclass

log = logging.getLogger(__name__)

LIBCUDA_ENV = "REVENANT_LIBCUDA"
DEFAULT_LIBCUDA = "libcuda.so.1"

# CUresult values the checkpoint code reasons about (cuda.h).
CUDA_SUCCESS = 0
CUDA_ERROR_INVALID_VALUE = 1
CUDA_ERROR_OUT_OF_MEMORY = 2
CUDA_ERROR_NOT_INITIALIZED = 3
CUDA_ERROR_NO_DEVICE = 100
CUDA_ERROR_OPERATING_SYSTEM = 304
CUDA_ERROR_ILLEGAL_STATE = 401
CUDA_ERROR_NOT_SUPPORTED = 801
CUDA_ERROR_TIMEOUT = 909

CHECKPOINT_SYMBOLS = (
    "cuCheckpointProcessGetState",
    "cuCheckpointProcessLock",
    "cuCheckpointProcessCheckpoint",
    "cuCheckpointProcessRestore",
    "cuCheckpointProcessUnlock",
)


class ProcessState(enum.IntEnum):
    """CUprocessState. CHECKPOINTING/RESTORING only exist in newer headers; kept so they read by name."""

    RUNNING = 0
    LOCKED = 1
    CHECKPOINTED = 2
    FAILED = 3
    CHECKPOINTING = 4
    RESTORING = 5


class CUcheckpointLockArgs(ctypes.Structure):
    _fields_ = [
        ("timeoutMs", ctypes.c_uint),
        ("reserved0", ctypes.c_uint),
        ("reserved1", ctypes.c_uint64 * 7),
    ]


class CUcheckpointCheckpointArgs(ctypes.Structure):
    _fields_ = [("reserved", ctypes.c_uint64 * 8)]


class CUuuid(ctypes.Structure):
    _fields_ = [("bytes", ctypes.c_ubyte * 16)]


class CUcheckpointGpuPair(ctypes.Structure):
    _fields_ = [("oldUuid", CUuuid), ("newUuid", CUuuid)]


class CUcheckpointRestoreArgs(ctypes.Structure):
    _fields_ = [
        ("gpuPairs", ctypes.POINTER(CUcheckpointGpuPair)),
        ("gpuPairsCount", ctypes.c_uint),
        ("reserved", ctypes.c_char * (52 - ctypes.sizeof(ctypes.c_void_p))),
        ("reserved1", ctypes.c_uint64),
    ]


class CUcheckpointUnlockArgs(ctypes.Structure):
    _fields_ = [("reserved", ctypes.c_uint64 * 8)]


for _struct in (CUcheckpointLockArgs, CUcheckpointCheckpointArgs, CUcheckpointRestoreArgs, CUcheckpointUnlockArgs):
    assert ctypes.sizeof(_struct) == 64, _struct  # the ABI cuda.h fixes; a mismatch would corrupt the call


class GpuError(Exception):
    """Base of every error of the GPU checkpoint support."""


class GpuUnavailable(GpuError):
    """No usable CUDA driver on this node (no libcuda, no checkpoint API, or cuInit failed)."""


class CudaError(GpuError):
    """A CUDA driver call returned an error; name/description come from cuGetErrorName/cuGetErrorString."""

    def __init__(self, call: str, code: int, name: str, description: str, pid: int | None = None):
        self.call, self.code, self.name, self.description, self.pid = call, code, name, description, pid
        target = f" (pid {pid})" if pid is not None else ""
        super().__init__(f"{call}{target} failed: {name} ({code}): {description}")


@dataclass(frozen=True)
class DeviceInfo:
    index: int
    name: str
    uuid: str
    total_memory_bytes: int


def libcuda_path() -> str:
    return os.environ.get(LIBCUDA_ENV) or DEFAULT_LIBCUDA


class CudaDriver:
    """A loaded, initialised libcuda. Methods raise CudaError with the driver's own error name."""

    def __init__(self, lib: ctypes.CDLL, path: str):
        self.path = path
        self._lib = lib
        for name in CHECKPOINT_SYMBOLS:
            fn = getattr(lib, name)
            fn.restype = ctypes.c_int
        lib.cuCheckpointProcessGetState.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_int)]
        lib.cuCheckpointProcessLock.argtypes = [ctypes.c_int, ctypes.POINTER(CUcheckpointLockArgs)]
        lib.cuCheckpointProcessCheckpoint.argtypes = [ctypes.c_int, ctypes.POINTER(CUcheckpointCheckpointArgs)]
        lib.cuCheckpointProcessRestore.argtypes = [ctypes.c_int, ctypes.POINTER(CUcheckpointRestoreArgs)]
        lib.cuCheckpointProcessUnlock.argtypes = [ctypes.c_int, ctypes.POINTER(CUcheckpointUnlockArgs)]
        lib.cuGetErrorName.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]
        lib.cuGetErrorName.restype = ctypes.c_int
        lib.cuGetErrorString.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]
        lib.cuGetErrorString.restype = ctypes.c_int
        lib.cuInit.argtypes = [ctypes.c_uint]
        lib.cuInit.restype = ctypes.c_int

    @classmethod
    def load(cls, path: str | None = None) -> CudaDriver:
        """dlopen libcuda (REVENANT_LIBCUDA, default libcuda.so.1) and cuInit(0); GpuUnavailable says why not."""
        path = path or libcuda_path()
        try:
            lib = ctypes.CDLL(path)
        except OSError as e:
            raise GpuUnavailable(f"no GPU support: cannot load {path}: {e}") from e
        missing = [
            s for s in (*CHECKPOINT_SYMBOLS, "cuInit", "cuGetErrorName", "cuGetErrorString") if not hasattr(lib, s)
        ]
        if missing:
            raise GpuUnavailable(
                f"no GPU support: {path} lacks {', '.join(missing)} "
                "(the checkpoint API needs driver 550+ / CUDA 12.8 API)"
            )
        drv = cls(lib, path)
        rc = lib.cuInit(0)
        if rc != CUDA_SUCCESS:
            err = drv._error("cuInit", rc)
            raise GpuUnavailable(f"no GPU support: {err}")
        return drv

    # -- error text ---------------------------------------------------------------------------------------
    def error_name(self, code: int) -> str:
        out = ctypes.c_char_p()
        if self._lib.cuGetErrorName(code, ctypes.byref(out)) != CUDA_SUCCESS or not out.value:
            return f"CUDA_ERROR_{code}"
        return out.value.decode(errors="replace")

    def error_string(self, code: int) -> str:
        out = ctypes.c_char_p()
        if self._lib.cuGetErrorString(code, ctypes.byref(out)) != CUDA_SUCCESS or not out.value:
            return "unknown error code"
        return out.value.decode(errors="replace")

    def _error(self, call: str, code: int, pid: int | None = None) -> CudaError:
        return CudaError(call, code, self.error_name(code), self.error_string(code), pid)

    def _check(self, call: str, code: int, pid: int | None = None) -> None:
        if code != CUDA_SUCCESS:
            raise self._error(call, code, pid)

    # -- the checkpoint API -------------------------------------------------------------------------------
    def get_state(self, pid: int) -> ProcessState | int:
        """The process's CUprocessState (an int when the driver returns a value this code does not know)."""
        state = ctypes.c_int(-1)
        self._check("cuCheckpointProcessGetState", self._lib.cuCheckpointProcessGetState(pid, ctypes.byref(state)), pid)
        try:
            return ProcessState(state.value)
        except ValueError:
            return state.value

    def lock(self, pid: int, timeout_ms: int) -> None:
        """RUNNING -> LOCKED; waits for submitted work. On timeout the driver leaves the process RUNNING."""
        args = CUcheckpointLockArgs(timeoutMs=max(0, int(timeout_ms)))
        self._check("cuCheckpointProcessLock", self._lib.cuCheckpointProcessLock(pid, ctypes.byref(args)), pid)

    def checkpoint(self, pid: int) -> None:
        """LOCKED -> CHECKPOINTED: device memory copied to host memory, GPU resources released."""
        args = CUcheckpointCheckpointArgs()
        self._check(
            "cuCheckpointProcessCheckpoint", self._lib.cuCheckpointProcessCheckpoint(pid, ctypes.byref(args)), pid
        )

    def restore(self, pid: int) -> None:
        """CHECKPOINTED -> LOCKED: GPU resources re-acquired, memory copied back (same GPUs, no remapping)."""
        args = CUcheckpointRestoreArgs()
        self._check("cuCheckpointProcessRestore", self._lib.cuCheckpointProcessRestore(pid, ctypes.byref(args)), pid)

    def unlock(self, pid: int) -> None:
        """LOCKED -> RUNNING."""
        args = CUcheckpointUnlockArgs()
        self._check("cuCheckpointProcessUnlock", self._lib.cuCheckpointProcessUnlock(pid, ctypes.byref(args)), pid)

    # -- node facts for the checkpoint metadata --------------------------------------------------------------
    def driver_version(self) -> int | None:
        fn = getattr(self._lib, "cuDriverGetVersion", None)
        if fn is None:
            return None
        v = ctypes.c_int(0)
        return v.value if fn(ctypes.byref(v)) == CUDA_SUCCESS else None

    def devices(self) -> list[DeviceInfo]:
        """Every device the driver sees: name, UUID, memory. Queries only; no context is created."""
        lib = self._lib
        count = ctypes.c_int(0)
        self._check("cuDeviceGetCount", lib.cuDeviceGetCount(ctypes.byref(count)))
        out = []
        for i in range(count.value):
            dev = ctypes.c_int(0)
            self._check("cuDeviceGet", lib.cuDeviceGet(ctypes.byref(dev), i))
            name = ctypes.create_string_buffer(256)
            self._check("cuDeviceGetName", lib.cuDeviceGetName(name, 256, dev))
            mem = ctypes.c_size_t(0)
            self._check("cuDeviceTotalMem_v2", lib.cuDeviceTotalMem_v2(ctypes.byref(mem), dev))
            uuid = CUuuid()
            get_uuid = getattr(lib, "cuDeviceGetUuid_v2", None) or lib.cuDeviceGetUuid
            self._check("cuDeviceGetUuid", get_uuid(ctypes.byref(uuid), dev))
            out.append(DeviceInfo(i, name.value.decode(errors="replace"), _format_uuid(bytes(uuid.bytes)), mem.value))
        return out


def _format_uuid(b: bytes) -> str:
    h = b.hex()
    return f"GPU-{h[0:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"  # nvidia-smi's spelling
