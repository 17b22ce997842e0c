"""Small helpers for driving ctr and inspecting what a node left behind."""

from __future__ import annotations

import errno
import os
import pty
import select
import subprocess
import time
from pathlib import Path

from harness.containerd import ContainerdNode
from harness.tools import require


def task_status(node: ContainerdNode, cid: str) -> str:
    for line in node.ctr("task", "ls").stdout.splitlines()[1:]:
        fields = line.split()
        if fields and fields[0] == cid:
            return fields[-1]
    return "ABSENT"


def ctr_with_tty(node: ContainerdNode, *args: str, timeout: float = 60) -> tuple[int, str]:
    """Run ctr with a pseudo-terminal as its stdio (`-t` needs a console); returns (code, output)."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [require("ctr", "containerd"), "-a", node.address, "-n", node.namespace, *args],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env=node.env,
        start_new_session=True,
    )
    os.close(slave)
    out = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError as e:
                    if e.errno != errno.EIO:
                        raise
                    data = b""
                if not data:
                    break
                out += data
            elif proc.poll() is not None:
                break
        code = proc.wait(max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    return code, out.decode(errors="replace")


def processes_of_node(node: ContainerdNode, *container_ids: str) -> list[int]:
    """Shims of the node (their command line names its socket) for these container ids."""
    found = []
    for pid_dir in Path("/proc").iterdir():
        if not pid_dir.name.isdigit():
            continue
        try:
            argv = (pid_dir / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if node.address.encode() in argv and any(c.encode() in argv for c in container_ids):
            found.append(int(pid_dir.name))
    return found


def shim_pid_of(node: ContainerdNode, cid: str) -> int:
    """The shim serving container `cid` (the stock shim's bundle has no shim.pid in 1.6)."""
    pids = processes_of_node(node, cid)
    if len(pids) != 1:
        raise AssertionError(f"expected one shim process for {cid}, found {pids}")
    return pids[0]
