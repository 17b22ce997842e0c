"""A threaded ttrpc server over stream sockets.

One reader thread per connection decodes frames; every request runs in its own thread, so a handler
that blocks (the shim's Wait) never stalls State or Kill on the same connection. Answers share a
per-connection write lock so frames never interleave.
"""

from __future__ import annotations

import contextlib
import logging
import selectors
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import DecodeError, Message
from google.protobuf.message_factory import GetMessageClass

from revenant_pb.ttrpc import ttrpc_pb2
from shim.errors import RevenantError
from shim.ttrpc.codec import RequestReceived, ServerProtocol, StreamRejected, encode_response
from shim.ttrpc.concurrency import DeadlineWatcher, Workers
from shim.ttrpc.errors import Code, status_of

log = logging.getLogger(__name__)

NAMESPACE_KEY = "containerd-namespace-ttrpc"
_RECV_SIZE = 256 * 1024


@dataclass
class Context:
    """What a handler knows about its call besides the request message."""

    namespace: str = ""
    metadata: dict[str, list[str]] = field(default_factory=dict)
    deadline: float | None = None  # time.monotonic() value, None when the caller set no timeout
    service: str = ""
    method: str = ""
    # Set when nobody waits for this call's answer any more: its deadline was answered for it, or the
    # connection closed (containerd restarted). A long handler (Wait) may watch it to stop early.
    cancelled: threading.Event = field(default_factory=threading.Event, repr=False, compare=False)

    def time_left(self) -> float | None:
        """Seconds until the deadline (never negative), None without one."""
        if self.deadline is None:
            return None
        return max(0.0, self.deadline - time.monotonic())


Handler = Callable[[Context, Message], Message]


@dataclass
class Service:
    name: str  # full proto name, e.g. "containerd.task.v2.Task"
    methods: dict[str, tuple[type[Message], Handler]]  # bare method name -> (request class, handler)

    @classmethod
    def from_descriptor(cls, descriptor: ServiceDescriptor, impl: object) -> Service:
        """The service a .proto declares (`<module>_pb2.DESCRIPTOR.services_by_name[NAME]`), served by
        `impl`, which has one method `Name(ctx, request) -> response` per rpc. An impl that lacks one is
        refused here, at registration, rather than answering Unimplemented on the first call."""
        methods: dict[str, tuple[type[Message], Handler]] = {}
        missing = []
        for method in descriptor.methods:
            if method.client_streaming or method.server_streaming:
                raise ValueError(f"{descriptor.full_name}/{method.name}: streaming rpcs are not supported")
            handler = getattr(impl, method.name, None)
            if not callable(handler):
                missing.append(method.name)
                continue
            methods[method.name] = (GetMessageClass(method.input_type), handler)
        if missing:
            raise TypeError(
                f"{type(impl).__name__} cannot serve {descriptor.full_name}: no method {', '.join(missing)}"
            )
        return cls(descriptor.full_name, methods)


class Server:
    def __init__(self, services: Iterable[Service] = ()) -> None:
        self._services: dict[str, Service] = {}
        for svc in services:
            self.register(svc)
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)  # notified when a connection's active count drops
        self._connections: set[_Connection] = set()
        self._stopping = threading.Event()
        self._stopped = threading.Event()
        self._serving = 0  # serve() calls running
        self._serve_threads: set[int] = set()
        self._started = False  # serve() was ever called: then its last call drains, not shutdown()
        self._grace = 10.0
        # Writing one byte that nobody reads keeps this readable for every serve() loop at once.
        self._wake_r, self._wake_w = socket.socketpair()
        self._deadlines = DeadlineWatcher()
        self._workers = Workers()
        self._handler_thread = threading.local()

    def register(self, service: Service) -> None:
        if service.name in self._services:
            raise ValueError(f"ttrpc service {service.name} registered twice")
        self._services[service.name] = service

    # ---- lifecycle ----------------------------------------------------------------------------

    def serve(self, listener: socket.socket) -> None:
        """Accept and serve connections on a bound, listening socket until shutdown(); then drain."""
        with self._lock:
            if self._stopping.is_set():
                return
            self._serving += 1
            self._started = True
            self._serve_threads.add(threading.get_ident())
        try:
            self._accept_loop(listener)
        finally:
            with self._lock:
                self._serving -= 1
                self._serve_threads.discard(threading.get_ident())
                last = self._serving == 0
            with contextlib.suppress(OSError):
                listener.close()  # stop accepting, as Go's Server.Shutdown does
            if last:
                self._drain()

    def shutdown(self, grace: float = 10.0) -> None:
        """Stop accepting, let running requests finish for up to `grace` seconds, close connections.

        Called from a handler (the shim's Shutdown RPC), it returns at once so that handler can still
        answer; serve() sends that answer before it closes the connection and returns. Called from the
        thread running serve() (a signal handler in the main thread) it returns at once too: serve()
        drains when the signal handler returns. Otherwise it waits until serve() has returned.
        """
        self._grace = grace
        self._stopping.set()
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        with self._lock:
            started = self._started
            in_serve = threading.get_ident() in self._serve_threads
        if not started:
            self._drain()
        elif not in_serve and not getattr(self._handler_thread, "active", False):
            self._stopped.wait(grace + 5.0)

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def _accept_loop(self, listener: socket.socket) -> None:
        with selectors.DefaultSelector() as sel:
            sel.register(listener, selectors.EVENT_READ)
            sel.register(self._wake_r, selectors.EVENT_READ)
            while not self._stopping.is_set():
                ready = sel.select()
                if self._stopping.is_set():
                    return
                if not any(key.fileobj is listener for key, _ in ready):
                    continue
                try:
                    sock, _ = listener.accept()
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError as exc:
                    if listener.fileno() < 0:
                        return
                    log.warning("ttrpc: accept failed: %s", exc)
                    time.sleep(0.05)  # e.g. EMFILE: do not spin
                    continue
                sock.setblocking(True)
                self._start_connection(sock)

    def _start_connection(self, sock: socket.socket) -> None:
        conn = _Connection(self, sock)
        with self._lock:
            if self._stopping.is_set():
                sock.close()
                return
            self._connections.add(conn)
        threading.Thread(target=conn.read_loop, name="ttrpc-conn", daemon=True).start()

    def _drain(self) -> None:
        end = time.monotonic() + self._grace
        with self._lock:
            while any(c.active for c in self._connections):
                left = end - time.monotonic()
                if left <= 0:
                    log.warning("ttrpc: closing connections with requests still running")
                    break
                self._idle.wait(left)
            conns = list(self._connections)
        for conn in conns:
            conn.close()
        self._deadlines.stop()
        self._workers.stop()
        self._wake_r.close()
        self._wake_w.close()
        self._stopped.set()

    def _forget(self, conn: _Connection) -> None:
        with self._lock:
            self._connections.discard(conn)
            self._idle.notify_all()

    # ---- requests -----------------------------------------------------------------------------

    def _dispatch(self, conn: _Connection, event: RequestReceived) -> None:
        if self._stopping.is_set():
            conn.send(encode_response(event.stream_id, Code.UNAVAILABLE, "ttrpc: server shutting down"))
            return
        with self._lock:
            conn.active += 1
        self._workers.submit(self._handle, conn, event)

    def _handle(self, conn: _Connection, event: RequestReceived) -> None:
        self._handler_thread.active = True
        try:
            self._answer(conn, event)
        finally:
            with self._lock:
                conn.active -= 1
                self._idle.notify_all()
            self._handler_thread.active = False

    def _answer(self, conn: _Connection, event: RequestReceived) -> None:
        req = event.request
        ctx = _context_for(req)
        call = _Call(conn, event.stream_id, ctx.cancelled)
        conn.track(call)
        try:
            if ctx.deadline is not None:
                self._deadlines.add(ctx.deadline, call)
            code, message, payload = self._invoke(ctx, req)
            if code == Code.OK and ctx.deadline is not None and time.monotonic() > ctx.deadline:
                code, message, payload = Code.DEADLINE_EXCEEDED, "context deadline exceeded", b""
            call.answer(code, message, payload)
        except Exception:  # never let a bug kill the thread without an answer
            log.exception("ttrpc: failed to answer %s/%s", req.service, req.method)
            call.answer(Code.INTERNAL, "ttrpc: internal server error")
        finally:
            conn.untrack(call)

    def _invoke(self, ctx: Context, req: ttrpc_pb2.Request) -> tuple[int, str, bytes]:
        svc = self._services.get(req.service)
        if svc is None:
            return Code.UNIMPLEMENTED, f"service {req.service}", b""
        entry = svc.methods.get(req.method)
        if entry is None:
            return Code.UNIMPLEMENTED, f"method {req.method}", b""
        request_type, handler = entry
        msg = request_type()
        try:
            msg.ParseFromString(req.payload)
        except DecodeError as exc:
            return Code.INVALID_ARGUMENT, f"cannot decode {request_type.__name__}: {exc}", b""
        try:
            result = handler(ctx, msg)
            return Code.OK, "", result.SerializeToString()
        except RevenantError as exc:  # the edge: a domain error becomes its status code here
            code, message = status_of(exc)
            log.debug("ttrpc: %s/%s -> %s (code %d)", req.service, req.method, message, code)
            return code, message, b""
        except Exception as exc:
            log.exception("ttrpc: handler %s/%s failed", req.service, req.method)
            return Code.INTERNAL, str(exc) or type(exc).__name__, b""


def _context_for(req: ttrpc_pb2.Request) -> Context:
    metadata: dict[str, list[str]] = {}
    for kv in req.metadata:
        metadata.setdefault(kv.key, []).append(kv.value)
    namespace = metadata.get(NAMESPACE_KEY, [""])[0]
    # Go semantics: any non-zero timeout sets a deadline (a negative one has already passed).
    deadline = time.monotonic() + req.timeout_nano / 1e9 if req.timeout_nano else None
    return Context(namespace, metadata, deadline, req.service, req.method)


class _Connection:
    def __init__(self, server: Server, sock: socket.socket) -> None:
        self.server = server
        self.sock = sock
        self.active = 0  # requests running; guarded by server._lock
        self._protocol = ServerProtocol()
        self._write_lock = threading.Lock()
        self._closed = False
        self._calls: set[_Call] = set()  # running calls, to cancel when the connection closes

    def track(self, call: _Call) -> None:
        with self._write_lock:
            self._calls.add(call)
            if self._closed:
                call.cancelled.set()

    def untrack(self, call: _Call) -> None:
        with self._write_lock:
            self._calls.discard(call)

    def read_loop(self) -> None:
        try:
            while True:
                data = self.sock.recv(_RECV_SIZE)
                if not data:
                    return
                for event in self._protocol.receive_data(data):
                    if isinstance(event, StreamRejected):
                        self.send(encode_response(event.stream_id, event.code, event.message))
                    else:
                        self.server._dispatch(self, event)
        except OSError as exc:
            if not self._closed:
                log.debug("ttrpc: connection read failed: %s", exc)
        finally:
            self.close()
            self.server._forget(self)

    def send(self, data: bytes) -> bool:
        with self._write_lock:
            if self._closed:
                return False
            try:
                self.sock.sendall(data)
                return True
            except OSError as exc:
                log.debug("ttrpc: cannot answer, connection gone: %s", exc)
                return False

    def close(self) -> None:
        with self._write_lock:
            if self._closed:
                return
            self._closed = True
            # shutdown() wakes the reader blocked in recv(); close() alone would not.
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)
            self.sock.close()
            for call in self._calls:
                call.cancelled.set()


class _Call:
    """One request's single answer: the handler's result or the deadline watcher's, whichever is first."""

    def __init__(self, conn: _Connection, stream_id: int, cancelled: threading.Event) -> None:
        self._conn = conn
        self._stream_id = stream_id
        self._lock = threading.Lock()
        self._answered = False
        self.cancelled = cancelled

    def expire(self) -> None:
        """The deadline passed: answer DeadlineExceeded unless already answered, and cancel the handler."""
        self.answer(Code.DEADLINE_EXCEEDED, "context deadline exceeded")
        self.cancelled.set()

    @property
    def answered(self) -> bool:
        return self._answered

    def answer(self, code: int, message: str = "", payload: bytes = b"") -> bool:
        with self._lock:
            if self._answered:
                return False
            self._answered = True
        return self._conn.send(encode_response(self._stream_id, code, message, payload))
