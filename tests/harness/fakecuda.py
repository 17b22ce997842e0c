"""The fake CUDA driver of one test (tests/gpu/fake_libcuda.c) and real child processes using a fake device."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from shim.gpu import GpuCoordinator

# A child that opens (and optionally maps) the device file, says "ready", then waits for stdin to close.
CHILD = textwrap.dedent("""
    import mmap, os, sys, threading
    dev, mode = sys.argv[1], sys.argv[2]
    keep = []
    if mode in ("fd", "map", "thread"):
        fd = os.open(dev, os.O_RDWR)
        if mode == "map":
            keep.append(mmap.mmap(fd, 4096))
            os.close(fd)             # only the mapping references the device now
        else:
            keep.append(fd)
    if mode == "thread":
        threading.Thread(target=sys.stdin.read, daemon=True).start()
    print("ready", flush=True)
    sys.stdin.read()
""")


class FakeCuda:
    """One test's fake driver: its own copy of the library (fresh static state), state dir and device."""

    def __init__(self, lib: Path, state_dir: Path, device: Path):
        self.lib, self.state_dir, self.device = lib, state_dir, device
        self.prefix = str(device.parent / "nvidia")
        self._children: list[subprocess.Popen[str]] = []

    # -- observing the fake ------------------------------------------------------------------------------
    def state(self, pid: int) -> str | None:
        p = self.state_dir / f"state.{pid}"
        return p.read_text().strip() if p.exists() else None

    def set_state(self, pid: int, state: str) -> None:
        (self.state_dir / f"state.{pid}").write_text(state + "\n")

    def calls(self, *, with_get_state: bool = False) -> list[str]:
        p = self.state_dir / "calls.log"
        lines = p.read_text().splitlines() if p.exists() else []
        return [ln for ln in lines if with_get_state or not ln.startswith("cuCheckpointProcessGetState")]

    def add_fault(self, rule: str) -> None:
        with open(self.state_dir / "faults", "a") as f:
            f.write(rule + "\n")

    def coordinator(self, **kw) -> GpuCoordinator:
        kw.setdefault("libcuda", str(self.lib))
        kw.setdefault("device_prefixes", (self.prefix,))
        kw.setdefault("lock_timeout_ms", 2000)
        kw.setdefault("call_timeout_s", 20.0)
        kw.setdefault("lock_grace_s", 5.0)
        kw.setdefault("retry_delay_s", 0.05)
        return GpuCoordinator(**kw)

    # -- real processes ----------------------------------------------------------------------------------
    def spawn(self, mode: str = "fd") -> subprocess.Popen[str]:
        """mode fd: holds the fake device open; map: only maps it; thread: fd + a second thread;
        plain: never touches it."""
        p = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(self.device), mode],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self._children.append(p)
        assert p.stdout is not None
        assert p.stdout.readline().strip() == "ready"
        return p

    def kill(self, p: subprocess.Popen[str]) -> None:
        if p.poll() is None:
            p.kill()
        p.wait(timeout=30)

    def close(self) -> None:
        for p in self._children:
            self.kill(p)
