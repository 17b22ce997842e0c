"""Run this tree's `revenant-snapshotter` for a test node, and talk to it (or to containerd) over gRPC."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import grpc

from harness.containerd import ContainerdNode
from harness.wait import wait_until
from revenant_pb.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from revenant_pb.containerd.services.snapshots.v1 import snapshots_pb2_grpc as pb_grpc

VENV_BIN = Path(sys.executable).parent


class SnapshotterProcess:
    """`revenant-snapshotter --address A --root R [--store URL]`; restartable, killable."""

    def __init__(self, address: str, root: Path, store: str | None = None, log_path: Path | None = None) -> None:
        self.address, self.root, self.store = address, Path(root), store
        self.log_path = log_path or self.root.parent / f"{self.root.name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, env: dict[str, str] | None = None, timeout: float = 20) -> None:
        cmd = [
            str(VENV_BIN / "revenant-snapshotter"),
            "--address",
            self.address,
            "--root",
            str(self.root),
            "--log-level",
            "DEBUG",
        ]
        if self.store:
            cmd += ["--store", self.store]
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.address)
        with open(self.log_path, "ab") as logf:
            self.proc = subprocess.Popen(
                cmd, stdout=logf, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}, start_new_session=True
            )
        proc = self.proc

        def answers() -> bool:
            if not os.path.exists(self.address):
                return False
            with self.client() as c:
                list(c.List(pb.ListSnapshotsRequest(), timeout=2))
            return True

        wait_until(
            answers,
            timeout,
            "revenant-snapshotter to answer",
            interval=0.05,
            ignore=(grpc.RpcError,),
            abort=lambda: "it exited at start-up" if proc.poll() is not None else None,
            detail=self.log_tail,
        )

    def stop(self, timeout: float = 15) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        rc = self.proc.returncode
        self.proc = None
        return rc

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def wait_dead(self, timeout: float = 30) -> int:
        assert self.proc is not None
        rc = self.proc.wait(timeout)
        self.proc = None
        return rc

    def restart(self, env: dict[str, str] | None = None) -> None:
        self.stop()
        self.start(env)

    @contextlib.contextmanager
    def client(self):  # -> Iterator[pb_grpc.SnapshotsStub]
        with grpc.insecure_channel(f"unix:{self.address}") as ch:
            yield pb_grpc.SnapshotsStub(ch)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


@contextlib.contextmanager
def containerd_snapshots(address: str, namespace: str):
    """containerd's own Snapshots gRPC service (the path the shim and ctr use), namespaced."""
    with grpc.insecure_channel(f"unix:{address}") as ch:
        stub = pb_grpc.SnapshotsStub(ch)
        yield stub, (("containerd-namespace", namespace),)


@dataclass
class RevenantNode:
    """A containerd node with this tree's revenant-snapshotter serving its `revenant` proxy plugin."""

    node: ContainerdNode
    snapshotter: SnapshotterProcess

    @property
    def snap_root(self) -> Path:
        return self.snapshotter.root


def wait_containerd_reaches(node: ContainerdNode, key: str, snapshotter: str = "revenant", timeout: float = 30) -> None:
    """Block until containerd's connection to the proxy snapshotter works again.

    containerd dials a proxy plugin in the background and, after a failed dial (snapshotter
    restarted), answers UNAVAILABLE until its reconnect backoff expires. Usage of an existing
    snapshot `key` goes through containerd's metadata layer to the backend, so it is the probe.
    """
    deadline = time.monotonic() + timeout
    with containerd_snapshots(node.address, node.namespace) as (stub, md):
        while True:
            try:
                stub.Usage(pb.UsageRequest(snapshotter=snapshotter, key=key), metadata=md, timeout=5)
                return
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
