"""A thread-safe ttrpc client: concurrent calls share one connection, each on its own odd stream id.

A reader thread matches responses to waiting callers by stream id. When the peer goes away every
waiting call raises ConnectionError; later calls do too, unless the client was made with
reconnect=True, in which case the next call dials again (containerd restarts, shims outlive it).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.message import DecodeError, Message
from google.protobuf.message_factory import GetMessageClass

from revenant_pb.ttrpc import ttrpc_pb2
from shim.ttrpc.codec import MAX_PAYLOAD, ClientProtocol, ResponseReceived
from shim.ttrpc.errors import Code, DeadlineExceeded, Internal, ResourceExhausted, error_from_status

log = logging.getLogger(__name__)

M = TypeVar("M", bound=Message)
_RECV_SIZE = 256 * 1024


def parse_address(address: str) -> str:
    """ "unix:///path", "/path" -> path; "unix://@name", "@name" -> abstract socket name ("\\0name")."""
    if address.startswith("unix://"):
        address = address[len("unix://") :]
    elif "://" in address:
        raise ValueError(f"unsupported ttrpc address {address!r}: only unix:// sockets are supported")
    if not address:
        raise ValueError("empty ttrpc address")
    if address.startswith("@"):
        return "\0" + address[1:]
    return address


class _Waiter:
    __slots__ = ("error", "event", "response")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.response: ttrpc_pb2.Response | None = None
        self.error: BaseException | None = None


class _Connection:
    """One socket, its stream ids and its waiting callers."""

    def __init__(self, address: str, timeout: float | None) -> None:
        self.address = address
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(parse_address(address))
            sock.settimeout(None)
        except OSError:
            sock.close()
            raise
        self.sock = sock
        self.protocol = ClientProtocol()
        self.lock = threading.Lock()  # stream ids, waiters, error
        self.write_lock = threading.Lock()  # frames must not interleave; ids go out in increasing order
        self.waiters: dict[int, _Waiter] = {}
        self.error: ConnectionError | None = None
        self.reader = threading.Thread(target=self._read_loop, name="ttrpc-client", daemon=True)
        self.reader.start()

    def start_call(self, req: ttrpc_pb2.Request) -> tuple[int, _Waiter]:
        waiter = _Waiter()
        with self.write_lock:
            with self.lock:
                if self.error is not None:
                    raise ConnectionError(str(self.error))
                stream_id = self.protocol.next_stream_id()
                self.waiters[stream_id] = waiter
            try:
                self.sock.sendall(self.protocol.encode_request(stream_id, req))
            except OSError as exc:
                self.forget(stream_id)
                raise ConnectionError(f"ttrpc: cannot send to {self.address}: {exc}") from exc
        return stream_id, waiter

    def forget(self, stream_id: int) -> None:
        with self.lock:
            self.waiters.pop(stream_id, None)

    def close(self, reason: str) -> None:
        with self.lock:
            if self.error is None:
                self.error = ConnectionError(f"ttrpc: {self.address}: {reason}")
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the reader blocked in recv()
        if self.reader is not threading.current_thread():
            self.reader.join(5.0)
        self.sock.close()

    def _read_loop(self) -> None:
        reason = "connection closed by peer"
        try:
            while True:
                data = self.sock.recv(_RECV_SIZE)
                if not data:
                    break
                for event in self.protocol.receive_data(data):
                    with self.lock:
                        waiter = self.waiters.pop(event.stream_id, None)
                    if waiter is None:
                        continue  # the caller gave up (timeout) or the server answered twice
                    if isinstance(event, ResponseReceived):
                        waiter.response = event.response
                    else:
                        waiter.error = error_from_status(event.code, event.message)
                    waiter.event.set()
        except OSError as exc:
            reason = f"connection failed: {exc}"
        except Exception as exc:  # a bug here must not leave callers waiting forever
            log.exception("ttrpc: client reader failed")
            reason = f"client reader failed: {exc}"
        finally:
            with self.lock:
                if self.error is None:
                    self.error = ConnectionError(f"ttrpc: {self.address}: {reason}")
                error = self.error
                waiters, self.waiters = self.waiters, {}
            for waiter in waiters.values():
                waiter.error = ConnectionError(str(error))
                waiter.event.set()


class Client:
    def __init__(self, address: str, timeout: float | None = None, *, reconnect: bool = False) -> None:
        """Connect to `address` now (OSError if nobody listens).

        `timeout` bounds connecting and is the default deadline of every call. With `reconnect`, a call
        made after the connection was lost dials again instead of raising ConnectionError; a call that
        was in flight when it was lost still raises (it may or may not have run).
        """
        parse_address(address)  # reject bad addresses before anything else
        self.address = address
        self.timeout = timeout
        self.reconnect = reconnect
        self._lock = threading.Lock()
        self._closed = False
        self._conn = _Connection(address, timeout)

    def call(
        self,
        service: str,
        method: str,
        request: Message,
        response_type: type[M],
        timeout: float | None = None,
        metadata: dict[str, str] | None = None,
    ) -> M:
        """Unary call. Raises the TtrpcError subclass of a non-OK answer, DeadlineExceeded when
        `timeout` (or the client's default) passes, ConnectionError when the connection is gone."""
        if timeout is None:
            timeout = self.timeout
        req = ttrpc_pb2.Request(service=service, method=method, payload=request.SerializeToString())
        if timeout is not None:
            if timeout <= 0:
                raise DeadlineExceeded(f"{service}/{method}: timeout {timeout} already passed")
            req.timeout_nano = max(1, int(timeout * 1e9))
        for key, value in (metadata or {}).items():
            req.metadata.add(key=key, value=value)
        size = req.ByteSize()
        if size > MAX_PAYLOAD:
            raise ResourceExhausted(f"{service}/{method}: request of {size} bytes exceeds the {MAX_PAYLOAD}-byte limit")

        conn = self._connection()
        stream_id, waiter = conn.start_call(req)
        if not waiter.event.wait(timeout):
            conn.forget(stream_id)
            if not waiter.event.is_set():
                raise DeadlineExceeded(f"{service}/{method}: no answer within {timeout}s")
        if waiter.error is not None:
            raise waiter.error
        resp = waiter.response
        assert resp is not None
        if resp.status.code != Code.OK:
            raise error_from_status(resp.status.code, resp.status.message)
        out = response_type()
        try:
            out.ParseFromString(resp.payload)
        except DecodeError as exc:
            raise Internal(f"{service}/{method}: cannot decode {response_type.__name__}: {exc}") from exc
        return out

    def _connection(self) -> _Connection:
        with self._lock:
            if self._closed:
                raise ConnectionError(f"ttrpc: client for {self.address} closed")
            if self._conn.error is not None and self.reconnect:
                try:
                    fresh = _Connection(self.address, self.timeout)
                except OSError as exc:
                    raise ConnectionError(f"ttrpc: cannot reconnect to {self.address}: {exc}") from exc
                old, self._conn = self._conn, fresh
                old.close("replaced by a new connection")
            return self._conn

    @property
    def closed(self) -> bool:
        """True once close() was called, or the connection is lost and will not be re-dialled."""
        return self._closed or (self._conn.error is not None and not self.reconnect)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            conn = self._conn
        conn.close("client closed")

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ServiceClient:
    """Typed calls to one service a .proto declares: `ServiceClient(client, desc, metadata).Checkpoint(req,
    timeout=5)` sends to desc's full name and decodes the rpc's declared response type.

    `metadata` goes with every call (e.g. {NAMESPACE_KEY: "default"}). A request of another type than
    the rpc takes, or an rpc the service does not declare, fails before anything is sent."""

    def __init__(self, client: Client, descriptor: ServiceDescriptor, metadata: dict[str, str] | None = None) -> None:
        self.client = client
        self.descriptor = descriptor
        self.metadata = dict(metadata or {})

    def __getattr__(self, name: str) -> Callable[..., Any]:
        method = self.descriptor.methods_by_name.get(name)
        if method is None:
            raise AttributeError(f"{self.descriptor.full_name} has no rpc {name}")
        return lambda request, timeout=None: self._call(method, request, timeout)

    def _call(self, method: MethodDescriptor, request: Message, timeout: float | None) -> Any:
        if request.DESCRIPTOR is not method.input_type:
            raise TypeError(
                f"{self.descriptor.full_name}/{method.name} takes {method.input_type.full_name}, "
                f"not {request.DESCRIPTOR.full_name}"
            )
        return self.client.call(
            self.descriptor.full_name,
            method.name,
            request,
            GetMessageClass(method.output_type),
            timeout=timeout,
            metadata=self.metadata,
        )
