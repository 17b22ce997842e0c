"""Driving transparent protection the way a user does: `ctr run` with revenant's annotations, a real
`revenant agent` process, node A destroyed, and a look into the store and the node registry.

Used by tests/protect, the demo (harness/demo.py) and bench/protect_bench.py.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .containerd import VENV_BIN, ContainerdNode
from .memjob import LOG_IN_CONTAINER, Step, memjob_args, read_steps
from .wait import wait_until

REVENANT_RUNTIME = "io.containerd.revenant.v1"
MARKER_PATH = "/data/marker"


@dataclass(frozen=True)
class Job:
    """A memjob that also writes a marker file into its writable layer (the filesystem proof)."""

    cid: str
    key: str
    store: str
    mib: int = 64
    seed: int = 11
    interval: str = "3s"
    interval_ms: int = 200
    marker: str = "revenant-was-here"
    on_stop: bool = False
    keep: int | None = None

    def annotations(self) -> dict[str, str]:
        a = {
            "revenant.io/checkpoint-key": self.key,
            "revenant.io/store": self.store,
            "revenant.io/checkpoint-interval": self.interval,
        }
        if self.on_stop:
            a["revenant.io/checkpoint-on-stop"] = "true"
        if self.keep is not None:
            a["revenant.io/keep"] = str(self.keep)
        return a

    def command(self) -> list[str]:
        job = shlex.join(memjob_args(self.mib, self.seed, interval_ms=self.interval_ms))
        # exec: the checkpointed process tree is memjob alone, the shell only set up the file.
        return ["sh", "-c", f"mkdir -p /data && echo {shlex.quote(self.marker)} > {MARKER_PATH} && exec {job}"]


def annotation_flags(annotations: dict[str, str]) -> list[str]:
    flags: list[str] = []
    for k, v in annotations.items():
        flags += ["--annotation", f"{k}={v}"]
    return flags


def run_job(
    node: ContainerdNode,
    image: str,
    job: Job,
    *,
    check: bool = True,
    annotations: dict[str, str] | None = None,
    command: list[str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """`ctr run -d` with revenant's runtime and the job's annotations: the same call on A and on B."""
    ann = job.annotations() if annotations is None else annotations
    return node.ctr(
        "run",
        "-d",
        "--runtime",
        REVENANT_RUNTIME,
        *annotation_flags(ann),
        image,
        job.cid,
        *(command or job.command()),
        check=check,
        input="",
        timeout=300,
    )


def job_log(node: ContainerdNode, cid: str) -> Path:
    return node.rootfs(cid) / LOG_IN_CONTAINER.lstrip("/")


def marker_of(node: ContainerdNode, cid: str) -> str | None:
    try:
        return (node.rootfs(cid) / MARKER_PATH.lstrip("/")).read_text().strip()
    except OSError:
        return None


def registry_record(node: ContainerdNode, cid: str) -> dict[str, Any] | None:
    path = node.revenant_run_dir / "tasks" / node.namespace / f"{cid}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def last_seq(node: ContainerdNode, cid: str) -> int:
    rec = registry_record(node, cid)
    last = (rec or {}).get("last_checkpoint") or {}
    return int(last.get("seq") or 0)


def wait_for_seq(node: ContainerdNode, cid: str, at_least: int, timeout: float = 120) -> int:
    wait_until(lambda: last_seq(node, cid) >= at_least, timeout, f"checkpoint seq {at_least} of {cid}")
    return last_seq(node, cid)


def task_status(node: ContainerdNode, cid: str) -> str:
    for line in node.ctr("task", "ls", input="").stdout.splitlines()[1:]:
        fields = line.split()
        if fields and fields[0] == cid:
            return fields[-1]
    return "ABSENT"


def wait_stopped(node: ContainerdNode, cid: str, timeout: float = 120) -> None:
    wait_until(lambda: task_status(node, cid) in ("STOPPED", "ABSENT"), timeout, f"{cid} stopped")


def destroy_node(node: ContainerdNode) -> None:
    """Node loss: containerd SIGKILLed, every process of the node killed, root and state wiped."""
    node.kill()
    node.destroy()


def store_checkpoints(store_url: str, key: str) -> list[Any]:
    from shim.store import open_store

    store = open_store(store_url)
    try:
        return store.list(key)
    finally:
        store.close()


class AgentProcess:
    """A real `revenant agent` process watching the local AWS metadata server for one node."""

    def __init__(self, run_dir: Path, metadata_url: str, log_path: Path, poll_interval: float = 0.5) -> None:
        self.run_dir = run_dir
        self.metadata_url = metadata_url
        self.log_path = log_path
        self.poll_interval = poll_interval
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        cmd = [
            str(VENV_BIN / "revenant"),
            "agent",
            "--provider",
            "aws",
            "--metadata-url",
            f"aws={self.metadata_url}",
            "--poll-interval",
            str(self.poll_interval),
            "--listen",
            "127.0.0.1:0",
            "--run-dir",
            str(self.run_dir),
            "--log-format",
            "json",
        ]
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(
                cmd,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={**os.environ, "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '')}"},
            )
        wait_until(
            lambda: "watching" in self.text(),
            30,
            "the agent to start",
            abort=lambda: "revenant agent exited at start-up" if self._died() else None,
            detail=self.text,
        )

    def _died(self) -> bool:
        return self.proc is not None and self.proc.poll() is not None

    def text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def results(self) -> list[dict[str, Any]]:
        """checkpoint_result events: one per task and drain (status, seq, error, bytes_uploaded ...)."""
        return [e for e in self.events() if e.get("event") == "checkpoint_result"]

    def wait_drain(self, timeout: float = 180) -> dict[str, Any]:
        """The drain_summary event of the first finished drain."""

        def summary() -> dict[str, Any] | None:
            for e in self.events():
                if e.get("event") == "drain_summary":
                    return e
            return None

        return wait_until(summary, timeout, f"the agent's drain to finish (log {self.log_path})")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


def shim_log(node: ContainerdNode) -> str:
    """The shim logs into containerd's log (the shim log FIFO)."""
    try:
        return node.log_path.read_text(errors="replace")
    except OSError:
        return ""


class EventWatcher:
    """`ctr events` on a node, collected into a file (the `/revenant/restore` event)."""

    def __init__(self, node: ContainerdNode, out: Path, ctr: str | None = None) -> None:
        self.out = out
        with open(out, "ab") as f:
            self.proc = subprocess.Popen(
                [ctr or node._ctr, "-a", node.address, "events"],
                stdout=f,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=node.env,
                start_new_session=True,
            )
        time.sleep(0.5)  # subscribed before anything happens

    def lines(self, topic: str) -> list[str]:
        try:
            return [ln for ln in self.out.read_text(errors="replace").splitlines() if topic in ln]
        except OSError:
            return []

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def checkpointed_steps(store_url: str, key: str, seq: int, scratch: Path) -> list[Step]:
    """The job log as the checkpoint `seq` holds it (inside its writable layer): where the job stood."""
    import tarfile

    from shim.store import open_store

    dest = scratch / f"ckpt-{seq}"
    store = open_store(store_url)
    try:
        store.get(key, dest, seq=seq, fallback=False)
    finally:
        store.close()
    with tarfile.open(dest / "rootfs-diff.tar") as tar:
        member = tar.extractfile(LOG_IN_CONTAINER.lstrip("/"))
        text = member.read().decode() if member else ""
    log = scratch / f"ckpt-{seq}.log"
    log.write_text(text)
    return read_steps(log)
