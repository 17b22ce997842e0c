"""A thread-safe ttrpc client: concurrent calls share one connection, each on its own odd stream id.

A reader thread matches responses to waiting callers by stream id. When the peer goes away every
waiting and later call raises ConnectionError.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
from typing import TypeVar

from google.protobuf.message import DecodeError, Message
from revenant_pb.ttrpc import ttrpc_pb2

from shim.ttrpc.codec import MAX_PAYLOAD, ClientProtocol, ResponseReceived
from shim.ttrpc.errors import (
    Code,
    DeadlineExceeded,
    Internal,
    ResourceExhausted,
    error_from_status,
)

log = logging.getLogger(__name__)

M = TypeVar("M", bound=Message)
_RECV_SIZE = 256 * 1024


def parse_address(address: str) -> str:
    """"unix:///path", "/path" -> path; "unix://@name", "@name" -> abstract socket name ("\\0name")."""
    if address.startswith("unix://"):
        address = address[len("unix://"):]
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


class Client:
    def __init__(self, address: str, timeout: float | None = None) -> None:
        """Connect to `address`; `timeout` bounds the connect and is the default for every call."""
        self.address = address
        self.timeout = timeout
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(parse_address(address))
            sock.settimeout(None)
        except OSError:
            sock.close()
            raise
        self._sock = sock
        self._protocol = ClientProtocol()
        self._lock = threading.Lock()  # stream ids, waiters, _error
        self._write_lock = threading.Lock()  # frames must not interleave; ids go out in increasing order
        self._waiters: dict[int, _Waiter] = {}
        self._error: ConnectionError | None = None
        self._reader = threading.Thread(target=self._read_loop, name="ttrpc-client", daemon=True)
        self._reader.start()

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
        body = req.SerializeToString()
        if len(body) > MAX_PAYLOAD:
            raise ResourceExhausted(
                f"{service}/{method}: request of {len(body)} bytes exceeds the {MAX_PAYLOAD}-byte limit"
            )

        waiter = _Waiter()
        with self._write_lock:
            with self._lock:
                if self._error is not None:
                    raise ConnectionError(str(self._error))
                stream_id = self._protocol.next_stream_id()
                self._waiters[stream_id] = waiter
            try:
                self._sock.sendall(self._protocol.encode_request(stream_id, req))
            except OSError as exc:
                with self._lock:
                    self._waiters.pop(stream_id, None)
                raise ConnectionError(f"ttrpc: cannot send to {self.address}: {exc}") from exc

        if not waiter.event.wait(timeout):
            with self._lock:
                self._waiters.pop(stream_id, None)
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

    def close(self) -> None:
        with self._lock:
            if self._error is None:
                self._error = ConnectionError(f"ttrpc: client for {self.address} closed")
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)  # wakes the reader blocked in recv()
        if self._reader is not threading.current_thread():
            self._reader.join(5.0)
        self._sock.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        return self._error is not None

    def _read_loop(self) -> None:
        reason = "connection closed by peer"
        try:
            while True:
                data = self._sock.recv(_RECV_SIZE)
                if not data:
                    break
                for event in self._protocol.receive_data(data):
                    with self._lock:
                        waiter = self._waiters.pop(event.stream_id, None)
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
            with self._lock:
                if self._error is None:
                    self._error = ConnectionError(f"ttrpc: {self.address}: {reason}")
                error = self._error
                waiters, self._waiters = self._waiters, {}
            for waiter in waiters.values():
                waiter.error = ConnectionError(str(error))
                waiter.event.set()


