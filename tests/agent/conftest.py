"""Fixtures for the agent tests: the local metadata server and stand-in shims.

The stand-ins are real ttrpc servers (shim.ttrpc.Server on unix sockets) implementing the
revenant.v1.Control service as docs/control.md describes it, so the agent's fan-out meets failures and
hangs on cue (tests/protect runs it against real shims end to end). They do not checkpoint anything: "ok"
answers like a successful checkpoint and rewrites its registry record as the shim would, "fail" answers
an error, "hang" never answers until the test ends.
"""

from __future__ import annotations

import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from harness.metadata_server import MetadataServer
from revenant_pb.revenant.v1 import control_pb2
from shim.protect.registry import LastCheckpoint, TaskRecord, write_task
from shim.ttrpc import Context, Internal, NotFound, Server, Service, Unimplemented

CONTROL = control_pb2.DESCRIPTOR.services_by_name["Control"]


@pytest.fixture
def metadata_server() -> Iterator[Callable[..., MetadataServer]]:
    """metadata_server() -> a started server for every provider; metadata_server(("aws",)) for one."""
    servers: list[MetadataServer] = []

    def make(providers: tuple[str, ...] = ("aws", "gcp", "azure")) -> MetadataServer:
        srv = MetadataServer(providers).start()
        servers.append(srv)
        return srv

    yield make
    for srv in servers:
        srv.stop()


@dataclass
class Call:
    namespace: str
    request: control_pb2.CheckpointRequest
    time_left: float | None


@dataclass
class StandInShim:
    """Serves revenant.v1.Control for one registered task; see the module docstring."""

    record: TaskRecord
    behavior: str  # "ok", "fail" or "hang"
    run_dir: Path
    timeline: list[str]
    calls: list[Call] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)
    server: Server | None = None

    def Checkpoint(self, ctx: Context, req: control_pb2.CheckpointRequest) -> control_pb2.CheckpointResponse:
        self.calls.append(Call(ctx.namespace, req, ctx.time_left()))
        if ctx.namespace != self.record.namespace or req.id != self.record.id:
            raise NotFound(f"container {ctx.namespace}/{req.id} not found")
        if self.behavior == "fail":
            self.timeline.append(f"failed {self.record.ref}")
            raise Internal("upload to store file:///nonexistent failed: store unreachable")
        if self.behavior == "hang":
            self.release.wait(120)
            raise Internal("released at test teardown")
        last = self.record.last_checkpoint
        seq = (last.seq if last else 0) + 1
        self.record.last_checkpoint = LastCheckpoint(seq=seq, time=time.time(), bytes_uploaded=4096, duration_s=0.01)
        write_task(self.run_dir, self.record)  # as the shim does after every checkpoint
        self.timeline.append(f"checkpointed {self.record.ref} exit={req.exit}")
        return control_pb2.CheckpointResponse(
            key=self.record.key, seq=seq, bytes_read=8192, bytes_uploaded=4096, freeze_s=0.005, total_s=0.01
        )

    def Status(self, ctx: Context, req: control_pb2.StatusRequest) -> control_pb2.StatusResponse:
        return control_pb2.StatusResponse(record_json=self.record.to_json())

    def Stats(self, ctx: Context, req: control_pb2.StatsRequest) -> control_pb2.StatsResponse:
        raise Unimplemented("the stand-in takes no real checkpoints")


@dataclass
class StandIns:
    run_dir: Path
    sock_dir: Path
    timeline: list[str] = field(default_factory=list)
    shims: list[StandInShim] = field(default_factory=list)
    _threads: list[threading.Thread] = field(default_factory=list)

    def add(self, id: str, behavior: str = "ok", namespace: str = "default", register: bool = True) -> StandInShim:
        """Start a stand-in shim for container `id`; `register=False` keeps it out of the registry."""
        address = f"unix://{self.sock_dir}/{namespace}-{id}.sock"
        record = TaskRecord(
            namespace=namespace,
            id=id,
            address=address,
            key=f"{namespace}/pod-{id}/main",
            store="file:///var/lib/revenant/store",
            interval_s=600,
            keep=3,
            shim_pid=1,
            task_pid=2,
        )
        shim = StandInShim(record, behavior, self.run_dir, self.timeline)
        svc = Service.from_descriptor(CONTROL, shim)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(address.removeprefix("unix://"))
        listener.listen(16)
        shim.server = Server([svc])
        thread = threading.Thread(target=shim.server.serve, args=(listener,), daemon=True)
        thread.start()
        self._threads.append(thread)
        self.shims.append(shim)
        if register:
            write_task(self.run_dir, record)
        return shim

    def close(self) -> None:
        for shim in self.shims:
            shim.release.set()
        for shim in self.shims:
            assert shim.server is not None
            shim.server.shutdown(grace=2.0)
        for thread in self._threads:
            thread.join(5)


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    d = tmp_path / "run"
    d.mkdir()
    return d


@pytest.fixture
def standins(run_dir: Path) -> Iterator[StandIns]:
    # Unix socket paths must stay under 108 bytes; pytest's tmp_path can be longer.
    sock_dir = Path(tempfile.mkdtemp(prefix="rv-agent-", dir="/tmp"))
    s = StandIns(run_dir, sock_dir)
    try:
        yield s
    finally:
        s.close()
        shutil.rmtree(sock_dir, ignore_errors=True)
