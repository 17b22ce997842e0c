"""Shim processes of a private containerd node and their memory, for the shim and pod benchmarks."""

from __future__ import annotations

from pathlib import Path


def shim_pids(address: str, binary: bytes) -> list[int]:
    """Pids of the shims of the containerd at `address` whose command line names `binary` (as the
    program, the interpreter's script, or its `-m` module: the zygote)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if address.encode() in argv and any(binary in a for a in argv[:3]):
            pids.append(int(proc.name))
    return pids


def rss_pss_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, Pss) of a process in KiB."""
    status = (Path("/proc") / str(pid) / "status").read_text()
    rss = int(next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1])
    rollup = (Path("/proc") / str(pid) / "smaps_rollup").read_text()
    pss = int(next(line for line in rollup.splitlines() if line.startswith("Pss:")).split()[1])
    return rss, pss
