"""Our Client against Go ttrpc peers: containerd's own ttrpc socket and a stock containerd-shim-runc-v2.

(Our Server driven by containerd itself is covered by the shim tests.)
"""

from __future__ import annotations

import queue
import subprocess
import threading
import uuid
from pathlib import Path

import pytest
from google.protobuf import any_pb2, empty_pb2

from harness.tools import require
from harness.wait import wait_until
from revenant_pb.containerd.services.events.ttrpc.v1 import events_pb2
from revenant_pb.testing import taskprobe_pb2
from shim.ttrpc import NAMESPACE_KEY, Client, InvalidArgument, NotFound, Unimplemented

EVENTS = "containerd.services.events.ttrpc.v1.Events"
TASK = "containerd.task.v2.Task"
STATUS_RUNNING = 2  # containerd.v1.types.Status


def task_exit_event(container_id: str) -> any_pb2.Any:
    """A containerd.events.TaskExit with only container_id=1 set, encoded by hand (we declare no events proto)."""
    data = container_id.encode()
    assert len(data) < 128
    return any_pb2.Any(type_url="containerd.events.TaskExit", value=b"\x0a" + bytes([len(data)]) + data)


def forward(client: Client, namespace: str, topic: str, event: any_pb2.Any) -> None:
    envelope = events_pb2.Envelope(namespace=namespace, topic=topic, event=event)
    envelope.timestamp.GetCurrentTime()
    client.call(
        EVENTS,
        "Forward",
        events_pb2.ForwardRequest(envelope=envelope),
        empty_pb2.Empty,
        timeout=10,
        metadata={NAMESPACE_KEY: namespace},
    )


class LineReader:
    """Collects a subprocess's stdout lines on a thread so the test can wait for one without blocking."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._pump, args=(proc,), daemon=True).start()

    def _pump(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            self.lines.put(line)

    def drain(self) -> list[str]:
        while True:
            try:
                self.seen.append(self.lines.get_nowait())
            except queue.Empty:
                return self.seen


def test_forward_event_to_containerd_reaches_ctr_events(containerd_node) -> None:
    node = containerd_node
    ctr = require("ctr", "containerd")
    proc = subprocess.Popen(
        [ctr, "-a", node.address, "events"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=node.env
    )
    try:
        reader = LineReader(proc)
        topic = f"/revenant/ttrpc-probe/{uuid.uuid4().hex[:12]}"
        container_id = f"probe-{uuid.uuid4().hex[:8]}"
        with Client(f"unix://{node.ttrpc_address}", timeout=10) as client:
            # `ctr events` subscribes asynchronously: forward until the subscriber shows the topic.
            def shown() -> bool:
                if any(topic in line for line in reader.drain()):
                    return True
                forward(client, node.namespace, topic, task_exit_event(container_id))  # again: not subscribed yet
                return False

            wait_until(
                shown,
                60,
                f"ctr events to show {topic}",
                interval=0.2,
                abort=lambda: "ctr events exited" if proc.poll() is not None else None,
                detail=lambda: f"seen: {reader.seen}",
            )
        line = next(line for line in reader.seen if topic in line)
        assert node.namespace in line
        assert container_id in line  # containerd decoded our Any as a TaskExit
    finally:
        proc.kill()
        proc.wait(10)


def test_containerd_rejects_an_invalid_envelope_with_a_status(containerd_node) -> None:
    """containerd's Go errors come back as our exception classes, and the connection stays usable."""
    node = containerd_node
    with Client(f"unix://{node.ttrpc_address}", timeout=10) as client:
        with pytest.raises(InvalidArgument, match="invalid namespace"):
            forward(client, "not a valid namespace!", "/x", task_exit_event("c"))
        with pytest.raises(InvalidArgument, match="topic"):
            forward(client, node.namespace, "no-leading-slash", task_exit_event("c"))
        with pytest.raises(Unimplemented):
            client.call(EVENTS, "NoSuchMethod", empty_pb2.Empty(), empty_pb2.Empty, timeout=10)
        with pytest.raises(Unimplemented):
            client.call("no.such.Service", "Forward", empty_pb2.Empty(), empty_pb2.Empty, timeout=10)
        forward(client, node.namespace, "/revenant/ttrpc-probe/after", task_exit_event("c"))


def shim_address(bundle: Path) -> str:
    address = (bundle / "address").read_text().strip()
    assert address.startswith("unix://"), address
    return address


def test_connect_and_state_on_a_stock_runc_shim(containerd_node, test_images) -> None:
    node = containerd_node
    image = node.import_image(test_images.busybox)
    cid = f"probe-{uuid.uuid4().hex[:8]}"
    node.ctr("run", "-d", "--runc-root", str(node.runc_root), image, cid, "sleep", "600")
    address = shim_address(node.bundle(cid))
    md = {NAMESPACE_KEY: node.namespace}

    with Client(address, timeout=10) as client:
        connected = client.call(
            TASK, "Connect", taskprobe_pb2.ConnectRequest(id=cid), taskprobe_pb2.ConnectResponse, metadata=md
        )
        assert connected.shim_pid > 0 and connected.task_pid > 0
        assert Path(f"/proc/{connected.shim_pid}").exists()

        state = client.call(TASK, "State", taskprobe_pb2.StateRequest(id=cid), taskprobe_pb2.StateResponse, metadata=md)
        assert state.id == cid
        assert state.pid == connected.task_pid
        assert state.status == STATUS_RUNNING
        assert Path(state.bundle) == node.bundle(cid)

        # Go errors map back onto our exception classes, and calls interleave on one connection.
        with pytest.raises(NotFound):
            client.call(
                TASK,
                "State",
                taskprobe_pb2.StateRequest(id=cid, exec_id="no-such-exec"),
                taskprobe_pb2.StateResponse,
                metadata=md,
            )
        with pytest.raises(Unimplemented):
            client.call(
                TASK, "NoSuchMethod", taskprobe_pb2.StateRequest(id=cid), taskprobe_pb2.StateResponse, metadata=md
            )

        results: list[int] = []
        errors: list[BaseException] = []

        def state_many() -> None:
            try:
                for _ in range(20):
                    results.append(
                        client.call(
                            TASK, "State", taskprobe_pb2.StateRequest(id=cid), taskprobe_pb2.StateResponse, metadata=md
                        ).pid
                    )
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=state_many) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert errors == []
        assert results == [connected.task_pid] * 160
