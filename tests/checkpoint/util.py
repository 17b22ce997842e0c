"""Driving a memjob through ctr checkpoint/restore on harness nodes, and listing what a node left."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from harness.containerd import ContainerdNode
from harness.memjob import (
    LOG_IN_CONTAINER,
    Step,
    assert_continuous,
    expected_checksum,
    memjob_args,
    read_steps,
    wait_for_step,
)
from harness.wait import wait_until

REVENANT = "io.containerd.revenant.v1"


def ctr(node: ContainerdNode, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    res = node.ctr(*args, check=False, timeout=timeout, input="")  # never hand ctr pytest's stdin
    if check and res.returncode != 0:
        raise AssertionError(f"ctr {' '.join(args)} failed ({res.returncode}): {res.stderr.strip()}")
    return res


def run_memjob(node: ContainerdNode, image: str, cid: str, mib: int, seed: int, *extra: str) -> Path:
    """Start a memjob under revenant's shim; returns its log (inside the container's rootfs)."""
    ctr(node, "run", "-d", "--runtime", REVENANT, *extra, image, cid, *memjob_args(mib, seed))
    log = memjob_log(node, cid)
    wait_for_step(log, 2, timeout=180)
    return log


def memjob_log(node: ContainerdNode, cid: str) -> Path:
    return node.rootfs(cid) / LOG_IN_CONTAINER.lstrip("/")


def remove(node: ContainerdNode, cid: str, container: bool = True) -> None:
    """Kill and delete the task (and the container) the way a user would."""
    ctr(node, "task", "kill", "-s", "SIGKILL", cid, check=False)
    wait_until(
        lambda: (
            ctr(node, "task", "rm", "-f", cid, check=False).returncode != 0
            or cid not in ctr(node, "task", "ls", "-q").stdout.split()
        ),
        30,
        f"task {cid} removed",
    )
    if container:
        ctr(node, "containers", "rm", cid)


def task_status(node: ContainerdNode, cid: str) -> str:
    for line in ctr(node, "task", "ls").stdout.splitlines()[1:]:
        fields = line.split()
        if fields and fields[0] == cid:
            return fields[-1]
    return "ABSENT"


def assert_resumed(
    node: ContainerdNode, cid: str, memjob_binary: Path, mib: int, seed: int, checkpointed_at: int
) -> list[Step]:
    """The restored job runs on from its checkpoint: its log (the writable layer came along) is one
    continuous run past `checkpointed_at`, the newest step's checksum is what replaying the job on the
    host gives, and a full-memory verification (SIGUSR1) passes."""
    log = memjob_log(node, cid)
    steps = wait_for_step(log, checkpointed_at + 3, timeout=120)
    assert steps[0].n <= 1, steps[:3]  # the log begins at the job's start: nothing was restarted
    assert_continuous(steps)
    last = steps[-1]
    assert last.checksum == expected_checksum(memjob_binary, mib, seed, last.n), last
    ctr(node, "task", "kill", "-s", "SIGUSR1", cid)
    verdict = wait_until(
        lambda: next((ln for ln in log.read_text().splitlines() if ln.startswith("verify=")), None),
        120,
        f"{cid} verify line",
    )
    assert str(verdict).startswith("verify=ok"), verdict
    return steps


def last_step(log: Path) -> int:
    steps = read_steps(log)
    return steps[-1].n if steps else -1


# -- what a node leaves behind ------------------------------------------------------------------
def processes_in_rootfs(node: ContainerdNode) -> list[int]:
    """Processes whose root directory lies inside the node (container processes, restored or not)."""
    prefix = str(node.dir) + "/"
    found = []
    for pid_dir in Path("/proc").iterdir():
        if not pid_dir.name.isdigit():
            continue
        try:
            root = str(Path(pid_dir / "root").readlink())
        except OSError:
            continue
        if root.startswith(prefix):
            found.append(int(pid_dir.name))
    return found


def container_spec(node: ContainerdNode, cid: str) -> dict:
    return json.loads(ctr(node, "containers", "info", cid).stdout)["Spec"]
