"""Our Server and Client talking over real unix sockets."""

from __future__ import annotations

import os
import random
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import uuid
from pathlib import Path

import pytest
from google.protobuf import empty_pb2, wrappers_pb2

from harness.unixsock import listen_unix
from revenant_pb.ttrpc import ttrpc_pb2
from shim.ttrpc import (
    NAMESPACE_KEY,
    Aborted,
    AlreadyExists,
    Client,
    Code,
    Context,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    Server,
    Service,
    TtrpcError,
    Unimplemented,
)
from shim.ttrpc.codec import MAX_PAYLOAD, FrameDecoder, FrameType, encode_frame

SVC = "revenant.test.Probe"
Str = wrappers_pb2.StringValue


class Probe:
    """Handlers whose behaviour each test steers; `release` unblocks Block calls."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.blocked = threading.Event()
        self.contexts: list[Context] = []
        self.in_block = 0
        self.changed = threading.Condition()
        self.waiting_cancel = threading.Event()
        self.saw_cancel = threading.Event()

    def echo(self, ctx: Context, req: Str) -> Str:
        self.contexts.append(ctx)
        return Str(value=f"{ctx.namespace}|{req.value}")

    def block(self, ctx: Context, req: Str) -> Str:
        with self.changed:
            self.in_block += 1
            self.changed.notify_all()
        self.blocked.set()
        self.release.wait(30)
        return Str(value="released")

    def wait_blocked(self, n: int) -> bool:
        with self.changed:
            return self.changed.wait_for(lambda: self.in_block >= n, 30)

    def until_cancelled(self, ctx: Context, req: Str) -> Str:
        self.waiting_cancel.set()
        if ctx.cancelled.wait(30):
            self.saw_cancel.set()
        return Str(value="done")

    def deadline(self, ctx: Context, req: Str) -> Str:
        left = ctx.time_left()
        return Str(value="none" if left is None else "set" if left > 0 else "passed")

    def fail(self, ctx: Context, req: Str) -> Str:
        exc = {
            "not-found": NotFound("no such task"),
            "exists": AlreadyExists("task exists"),
            "precondition": FailedPrecondition("task is not running"),
            "invalid": InvalidArgument("bad id"),
            "unimplemented": Unimplemented("no checkpoint"),
            "internal": Internal("broken"),
            "explicit-code": TtrpcError("aborted by code", Code.ABORTED),
            "runtime": RuntimeError("boom"),
        }[req.value]
        raise exc

    def service(self) -> Service:
        return Service(
            SVC,
            {
                "Echo": (Str, self.echo),
                "Block": (Str, self.block),
                "Deadline": (Str, self.deadline),
                "UntilCancelled": (Str, self.until_cancelled),
                "Fail": (Str, self.fail),
            },
        )


@pytest.fixture
def probe() -> Probe:
    p = Probe()
    yield p
    p.release.set()


def call(client: Client, method: str, value: str = "", **kw: object) -> str:
    return client.call(SVC, method, Str(value=value), Str, **kw).value


def test_round_trip_carries_namespace_and_metadata(serve, probe: Probe) -> None:
    srv = serve(probe.service())
    with Client(srv.address) as client:
        assert call(client, "Echo", "hi", metadata={NAMESPACE_KEY: "k8s.io", "x-extra": "1"}) == "k8s.io|hi"
        assert call(client, "Echo", "plain") == "|plain"
    ctx = probe.contexts[0]
    assert ctx.metadata == {NAMESPACE_KEY: ["k8s.io"], "x-extra": ["1"]}
    assert (ctx.service, ctx.method, ctx.deadline) == (SVC, "Echo", None)


def test_plain_path_address(serve, probe: Probe) -> None:
    srv = serve(probe.service())
    with Client(str(srv.path)) as client:
        assert call(client, "Echo", "x") == "|x"


def test_abstract_socket_address(probe: Probe) -> None:
    name = f"revenant-ttrpc-test-{uuid.uuid4().hex}"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind("\0" + name)
    listener.listen()
    server = Server([probe.service()])
    thread = threading.Thread(target=server.serve, args=(listener,), daemon=True)
    thread.start()
    try:
        with Client(f"unix://@{name}") as client:
            assert call(client, "Echo", "abstract") == "|abstract"
    finally:
        server.shutdown(grace=1.0)
        thread.join(10)
    assert not thread.is_alive()


def test_blocking_call_does_not_stall_another(serve, probe: Probe) -> None:
    srv = serve(probe.service())
    with Client(srv.address) as client:
        result: list[str] = []
        waiter = threading.Thread(target=lambda: result.append(call(client, "Block")))
        waiter.start()
        assert probe.blocked.wait(10)
        # Same connection, while Block is still running:
        assert call(client, "Echo", "meanwhile") == "|meanwhile"
        assert result == []
        probe.release.set()
        waiter.join(10)
        assert result == ["released"]


def test_many_blocked_calls_each_hold_a_thread_and_never_queue(serve, probe: Probe) -> None:
    srv = serve(probe.service())
    with Client(srv.address) as client:
        # Warm the server's idle threads first, so reuse is exercised, not just fresh threads.
        for i in range(5):
            assert call(client, "Echo", str(i)) == f"|{i}"
        results: list[str] = []
        waiters = [threading.Thread(target=lambda: results.append(call(client, "Block"))) for _ in range(20)]
        for t in waiters:
            t.start()
        assert probe.wait_blocked(20), f"only {probe.in_block} of 20 blocking calls are running"
        assert call(client, "Echo", "meanwhile") == "|meanwhile"
        probe.release.set()
        for t in waiters:
            t.join(30)
        assert results == ["released"] * 20


def test_many_threads_calling_at_once_get_their_own_answers(serve, probe: Probe) -> None:
    srv = serve(probe.service())
    errors: list[BaseException] = []
    with Client(srv.address) as client:
        start = threading.Barrier(16)

        def worker(n: int) -> None:
            try:
                start.wait()
                for i in range(40):
                    value = f"{n}-{i}"
                    got = call(client, "Echo", value, metadata={NAMESPACE_KEY: f"ns{n}"})
                    assert got == f"ns{n}|{value}"
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(n,)) for n in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert errors == []
    assert len(probe.contexts) == 16 * 40


def test_client_timeout_raises_deadline_exceeded_and_connection_stays_usable(serve, probe: Probe) -> None:
    srv = serve(probe.service())
    with Client(srv.address) as client:
        with pytest.raises(DeadlineExceeded):
            call(client, "Block", timeout=0.2)
        assert call(client, "Echo", "after") == "|after"
        probe.release.set()  # the late answer to the abandoned stream is dropped
        assert call(client, "Echo", "still") == "|still"


def test_handler_sees_deadline_from_timeout_nano(serve, probe: Probe) -> None:
    srv = serve(probe.service())
    with Client(srv.address) as client:
        assert call(client, "Deadline", timeout=30) == "set"
        assert call(client, "Deadline") == "none"
    with Client(srv.address, timeout=30) as client:
        assert call(client, "Deadline") == "set"  # the client's default timeout applies


def raw_exchange(
    path: Path,
    *frames: bytes,
    answers: int,
    byte_by_byte: bool = False,
) -> list[tuple[int, ttrpc_pb2.Response]]:
    """Send raw frames, return the answers as (stream_id, Response) pairs in arrival order."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(path))
    sock.settimeout(30)
    try:
        wire = b"".join(frames)
        if byte_by_byte:
            for i in range(len(wire)):
                sock.sendall(wire[i : i + 1])
        else:
            sock.sendall(wire)  # all frames in one write
        dec = FrameDecoder()
        got = []
        while len(got) < answers:
            data = sock.recv(65536)
            assert data, "server closed the connection"
            for frame in dec.feed(data):
                resp = ttrpc_pb2.Response()
                resp.ParseFromString(frame.payload)
                got.append((frame.stream_id, resp))
        return got
    finally:
        sock.close()


def request(method: str, value: str = "", timeout_nano: int = 0, service: str = SVC) -> bytes:
    payload = Str(value=value).SerializeToString()
    req = ttrpc_pb2.Request(service=service, method=method, payload=payload, timeout_nano=timeout_nano)
    return req.SerializeToString()


def test_requests_sent_byte_by_byte_and_several_in_one_write(serve, probe: Probe) -> None:
    srv = serve(probe.service())
    frames = [encode_frame(n, FrameType.REQUEST, request("Echo", f"v{n}")) for n in (1, 3, 5)]
    for byte_by_byte in (True, False):
        answers = dict(raw_exchange(srv.path, *frames, answers=3, byte_by_byte=byte_by_byte))
        assert {sid: Str.FromString(r.payload).value for sid, r in answers.items()} == {
            1: "|v1",
            3: "|v3",
            5: "|v5",
        }


def test_server_answers_deadline_exceeded_while_handler_still_runs(serve, probe: Probe) -> None:
    srv = serve(probe.service())
    # No client-side timer here: the answer must come from the server's own deadline.
    frame = encode_frame(1, FrameType.REQUEST, request("Block", timeout_nano=200_000_000))
    [(sid, resp)] = raw_exchange(srv.path, frame, answers=1)
    assert sid == 1 and resp.status.code == Code.DEADLINE_EXCEEDED
    assert probe.blocked.is_set()


def test_handler_context_is_cancelled_at_the_deadline(serve, probe: Probe) -> None:
    srv = serve(probe.service())
    frame = encode_frame(1, FrameType.REQUEST, request("UntilCancelled", timeout_nano=200_000_000))
    [(_, resp)] = raw_exchange(srv.path, frame, answers=1)
    assert resp.status.code == Code.DEADLINE_EXCEEDED
    assert probe.saw_cancel.wait(30)


def test_handler_context_is_cancelled_when_the_connection_closes(serve, probe: Probe) -> None:
    srv = serve(probe.service())
    client = Client(srv.address)
    errors: list[BaseException] = []

    def waiting_call() -> None:
        try:
            call(client, "UntilCancelled")
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=waiting_call)
    t.start()
    assert probe.waiting_cancel.wait(30)
    assert not probe.saw_cancel.is_set()
    client.close()  # containerd going away mid-Wait
    assert probe.saw_cancel.wait(30)
    t.join(30)
    assert len(errors) == 1 and isinstance(errors[0], ConnectionError)


def test_even_stream_id_gets_invalid_argument(serve, probe: Probe) -> None:
    srv = serve(probe.service())
    answers = raw_exchange(
        srv.path,
        encode_frame(2, FrameType.REQUEST, request("Echo", "even")),
        encode_frame(3, FrameType.REQUEST, request("Echo", "odd")),
        answers=2,
    )
    by_stream = dict(answers)
    assert by_stream[2].status.code == Code.INVALID_ARGUMENT
    assert by_stream[3].status.code == Code.OK


def test_oversized_request_gets_resource_exhausted_and_connection_survives(serve, probe: Probe) -> None:
    srv = serve(probe.service())
    size = MAX_PAYLOAD + 100
    oversized = struct.pack(">IIBB", size, 1, FrameType.REQUEST, 0) + b"\0" * size
    ok = encode_frame(3, FrameType.REQUEST, request("Echo", "after"))
    by_stream = dict(raw_exchange(srv.path, oversized, ok, answers=2))
    assert by_stream[1].status.code == Code.RESOURCE_EXHAUSTED
    assert by_stream[3].status.code == Code.OK
    assert Str.FromString(by_stream[3].payload).value == "|after"


def test_garbage_on_one_connection_does_not_hurt_the_server(serve, probe: Probe) -> None:
    srv = serve(probe.service())
    rng = random.Random(3)
    for _ in range(5):
        junk = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        junk.connect(str(srv.path))
        junk.sendall(rng.randbytes(rng.randrange(1, 20000)))
        junk.close()
    with Client(srv.address) as client:
        assert call(client, "Echo", "still serving") == "|still serving"


def test_unknown_frame_type_is_ignored(serve, probe: Probe) -> None:
    srv = serve(probe.service())
    answers = raw_exchange(
        srv.path,
        encode_frame(1, 0x42, b"whatever"),
        encode_frame(3, FrameType.REQUEST, request("Echo", "x")),
        answers=1,
    )
    assert [sid for sid, _ in answers] == [3]


def test_client_refuses_oversized_request(serve, probe: Probe) -> None:
    srv = serve(probe.service())
    with Client(srv.address) as client:
        with pytest.raises(TtrpcError) as info:
            call(client, "Echo", "x" * (MAX_PAYLOAD + 1))
        assert info.value.code == Code.RESOURCE_EXHAUSTED
        assert call(client, "Echo", "small") == "|small"


@pytest.mark.parametrize(
    ("case", "exc_type", "code", "message"),
    [
        ("not-found", NotFound, 5, "no such task"),
        ("exists", AlreadyExists, 6, "task exists"),
        ("precondition", FailedPrecondition, 9, "task is not running"),
        ("invalid", InvalidArgument, 3, "bad id"),
        ("unimplemented", Unimplemented, 12, "no checkpoint"),
        ("internal", Internal, 13, "broken"),
        ("explicit-code", Aborted, 10, "aborted by code"),
        ("runtime", Internal, 13, "boom"),
    ],
)
def test_exceptions_map_to_codes_and_back(serve, probe: Probe, case, exc_type, code, message) -> None:
    srv = serve(probe.service())
    with Client(srv.address) as client, pytest.raises(exc_type) as info:
        call(client, "Fail", case)
    assert info.value.code == code
    assert info.value.message == message


def test_unexpected_exception_is_logged_with_traceback(serve, probe: Probe, caplog) -> None:
    srv = serve(probe.service())
    with Client(srv.address) as client, pytest.raises(Internal):
        call(client, "Fail", "runtime")
    assert any(r.exc_info and "boom" in str(r.exc_info[1]) for r in caplog.records)


def test_unknown_service_or_method_is_unimplemented(serve, probe: Probe) -> None:
    srv = serve(probe.service())
    with Client(srv.address) as client:
        with pytest.raises(Unimplemented) as info:
            client.call("no.such.Service", "Echo", Str(), Str)
        assert info.value.code == 12
        with pytest.raises(Unimplemented):
            client.call(SVC, "NoSuchMethod", Str(), Str)


def test_undecodable_request_payload_is_invalid_argument(serve, probe: Probe) -> None:
    srv = serve(probe.service())
    frame = encode_frame(
        1, FrameType.REQUEST, ttrpc_pb2.Request(service=SVC, method="Echo", payload=b"\x0a\xff").SerializeToString()
    )
    [(_, resp)] = raw_exchange(srv.path, frame, answers=1)
    assert resp.status.code == Code.INVALID_ARGUMENT


def test_shutdown_from_a_handler_still_answers_it(tmp_path: Path) -> None:
    """The shim's Shutdown RPC stops the server from inside a handler; its answer must still go out."""
    server = Server()

    def stop(ctx: Context, req: empty_pb2.Empty) -> empty_pb2.Empty:
        server.shutdown(grace=5.0)
        return empty_pb2.Empty()

    server.register(Service("revenant.test.Life", {"Shutdown": (empty_pb2.Empty, stop)}))
    thread = threading.Thread(target=server.serve, args=(listen_unix(tmp_path / "s.sock"),), daemon=True)
    thread.start()
    with Client(f"unix://{tmp_path / 's.sock'}") as client:
        client.call("revenant.test.Life", "Shutdown", empty_pb2.Empty(), empty_pb2.Empty)
        thread.join(10)
        assert not thread.is_alive(), "serve() did not return after shutdown"
        with pytest.raises(ConnectionError):
            client.call("revenant.test.Life", "Shutdown", empty_pb2.Empty(), empty_pb2.Empty)
    assert not (tmp_path / "s.sock").exists() or _refuses(tmp_path / "s.sock")


def _refuses(path: Path) -> bool:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
    except OSError:
        return True
    finally:
        sock.close()
    return False


def test_server_shutdown_waits_for_running_calls(serve, probe: Probe) -> None:
    srv = serve(probe.service())
    with Client(srv.address) as client:
        result: list[str] = []
        t = threading.Thread(target=lambda: result.append(call(client, "Block")))
        t.start()
        assert probe.blocked.wait(10)
        stopper = threading.Thread(target=srv.server.shutdown, kwargs={"grace": 30.0})
        stopper.start()
        probe.release.set()
        t.join(30)
        stopper.join(30)
        assert result == ["released"]
        srv.thread.join(10)
        assert not srv.thread.is_alive()
        with pytest.raises(ConnectionError):
            call(client, "Echo")


def test_client_close_fails_waiting_calls(serve, probe: Probe) -> None:
    srv = serve(probe.service())
    client = Client(srv.address)
    errors: list[BaseException] = []

    def blocked_call() -> None:
        try:
            call(client, "Block")
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=blocked_call)
    t.start()
    assert probe.blocked.wait(10)
    client.close()
    t.join(10)
    assert len(errors) == 1 and isinstance(errors[0], ConnectionError)
    with pytest.raises(ConnectionError):
        call(client, "Echo")


SERVER_SCRIPT = textwrap.dedent("""
    import socket, sys, threading
    from google.protobuf import wrappers_pb2
    from shim.ttrpc import Server, Service
    def block(ctx, req):
        print("blocked", flush=True)
        threading.Event().wait()
    def echo(ctx, req):
        return req
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(sys.argv[1]); s.listen()
    server = Server([Service("revenant.test.Probe", {
        "Block": (wrappers_pb2.StringValue, block), "Echo": (wrappers_pb2.StringValue, echo)})])
    print("ready", flush=True)
    server.serve(s)
""")


def test_client_sees_connection_error_when_the_server_process_dies(tmp_path: Path) -> None:
    path = tmp_path / "dying.sock"
    cmd = [sys.executable, "-c", SERVER_SCRIPT, str(path)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        client = Client(f"unix://{path}")
        assert call(client, "Echo", "alive") == "alive"
        errors: list[BaseException] = []

        def blocked_call() -> None:
            try:
                call(client, "Block")
            except BaseException as exc:
                errors.append(exc)

        t = threading.Thread(target=blocked_call)
        t.start()
        assert proc.stdout.readline().strip() == "blocked"  # the call is in flight on the server
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        t.join(10)
        assert not t.is_alive()
        assert len(errors) == 1 and isinstance(errors[0], ConnectionError)
        with pytest.raises(ConnectionError):
            call(client, "Echo", "dead")
        client.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_reconnecting_client_dials_again_after_the_server_restarts(tmp_path: Path) -> None:
    path = tmp_path / "restart.sock"

    def start() -> tuple[Server, threading.Thread]:
        server = Server([Service(SVC, {"Echo": (Str, lambda ctx, req: req)})])
        thread = threading.Thread(target=server.serve, args=(listen_unix(path),), daemon=True)
        thread.start()
        return server, thread

    server, thread = start()
    plain = Client(f"unix://{path}")
    sticky = Client(f"unix://{path}", reconnect=True)
    try:
        assert call(plain, "Echo", "1") == call(sticky, "Echo", "1") == "1"
        server.shutdown(grace=1.0)
        thread.join(10)
        path.unlink()
        with pytest.raises(ConnectionError):
            call(sticky, "Echo", "nobody listens")  # the redial fails: still a ConnectionError
        server, thread = start()
        with pytest.raises(ConnectionError):
            call(plain, "Echo", "2")
        assert plain.closed
        assert call(sticky, "Echo", "2") == "2"
        assert not sticky.closed
    finally:
        plain.close()
        sticky.close()
        server.shutdown(grace=1.0)
        thread.join(10)
    with pytest.raises(ConnectionError):
        call(sticky, "Echo", "after close")


SIGNAL_SERVER_SCRIPT = textwrap.dedent("""
    import signal, socket, sys
    from shim.ttrpc import Server
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(sys.argv[1]); s.listen()
    server = Server()
    signal.signal(signal.SIGTERM, lambda *_: server.shutdown())
    print("ready", flush=True)
    server.serve(s)
    print("served", flush=True)
""")


def test_shutdown_from_a_signal_handler_in_the_serving_thread(tmp_path: Path) -> None:
    """The shim serves in its main thread and stops on SIGTERM: shutdown() must not wait for itself."""
    path = tmp_path / "signal.sock"
    cmd = [sys.executable, "-c", SIGNAL_SERVER_SCRIPT, str(path)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        client = Client(f"unix://{path}")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert proc.stdout.read().strip() == "served"
        with pytest.raises(ConnectionError):
            client.call("x.Y", "Z", Str(), Str)
        client.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_connect_to_missing_socket_raises_oserror(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        Client(f"unix://{tmp_path / 'nobody.sock'}", timeout=5)
    with pytest.raises(ValueError):
        Client("tcp://127.0.0.1:1")
