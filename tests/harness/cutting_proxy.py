"""A TCP proxy on 127.0.0.1 in front of a real server that, once armed, cuts one HTTP response short: it
forwards the headers of the next successful response with a body of at least `min_body` bytes and `keep`
bytes of that body, then closes both sides (what a server stopped or a connection reset mid-transfer does
to the client, on demand instead of by timing).

It follows every HTTP/1.1 exchange on a connection, armed or not, so that it knows where each response
starts on a reused connection: request and response bodies by Content-Length or chunked framing, and no
body for the answer to a HEAD (its Content-Length is the object's) or a 1xx/204/304. A connection it cannot
follow (a chunked request body) is passed through untouched from then on.
"""

from __future__ import annotations

import contextlib
import re
import socket
import threading
from collections import deque

_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length: *(\d+)\r\n", re.I)
_CHUNKED = re.compile(rb"\r\ntransfer-encoding:[^\r]*chunked", re.I)


class _Reader:
    """Buffered reads of one socket; EOFError when it ends."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock, self.buf = sock, b""

    def _fill(self) -> None:
        data = self.sock.recv(1 << 16)
        if not data:
            raise EOFError
        self.buf += data

    def until(self, sep: bytes) -> bytes:
        while (i := self.buf.find(sep)) < 0:
            self._fill()
        out, self.buf = self.buf[: i + len(sep)], self.buf[i + len(sep) :]
        return out

    def forward(self, n: int, dst: socket.socket) -> None:
        while n:
            if not self.buf:
                self._fill()
            k = min(n, len(self.buf))
            dst.sendall(self.buf[:k])
            self.buf, n = self.buf[k:], n - k

    def forward_chunked(self, dst: socket.socket) -> None:
        while True:
            line = self.until(b"\r\n")
            dst.sendall(line)
            size = int(line.split(b";")[0].strip() or b"0", 16)
            if size == 0:  # the trailers, up to an empty line
                while (trailer := self.until(b"\r\n")) != b"\r\n":
                    dst.sendall(trailer)
                dst.sendall(trailer)
                return
            self.forward(size + 2, dst)

    def take(self, n: int) -> bytes:
        if not self.buf:
            self._fill()
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def pass_through(self, dst: socket.socket) -> None:
        dst.sendall(self.buf)
        self.buf = b""
        while data := self.sock.recv(1 << 16):
            dst.sendall(data)


class _Connection:
    """What the two directions of one proxied connection share: the methods of requests not yet answered."""

    def __init__(self) -> None:
        self.methods: deque[bytes] = deque()
        self.opaque = False  # a request the proxy cannot delimit: pass everything through


class CuttingProxy:
    def __init__(self, target_port: int, min_body: int = 8192, keep: int = 1000) -> None:
        self.target_port, self.min_body, self.keep = target_port, min_body, keep
        self.cuts = 0
        self._armed = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._closed = False
        threading.Thread(target=self._accept, daemon=True, name="cutting-proxy").start()

    def arm(self) -> None:
        self._armed.set()

    def close(self) -> None:
        self._closed = True
        self._listener.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target_port))
            conn = _Connection()
            threading.Thread(target=self._requests, args=(client, server, conn), daemon=True).start()
            threading.Thread(target=self._responses, args=(server, client, conn), daemon=True).start()

    def _requests(self, src: socket.socket, dst: socket.socket, conn: _Connection) -> None:
        reader = _Reader(src)
        try:
            while True:
                head = reader.until(b"\r\n\r\n")
                length = _CONTENT_LENGTH.search(head)
                if _CHUNKED.search(head):
                    conn.opaque = True
                conn.methods.append(head.split(b" ", 1)[0])  # before the server can have it, so before its answer
                dst.sendall(head)
                if conn.opaque:
                    reader.pass_through(dst)
                    return
                reader.forward(int(length.group(1)) if length else 0, dst)
        except (OSError, EOFError):
            pass
        finally:
            _close(src, dst)

    def _responses(self, src: socket.socket, dst: socket.socket, conn: _Connection) -> None:
        reader = _Reader(src)
        try:
            while True:
                head = reader.until(b"\r\n\r\n")
                if conn.opaque:
                    dst.sendall(head)
                    reader.pass_through(dst)
                    return
                status = int(head[9:12])
                if 100 <= status < 200:  # an interim answer: the real one follows for the same request
                    dst.sendall(head)
                    continue
                method = conn.methods.popleft() if conn.methods else b"GET"
                length = _CONTENT_LENGTH.search(head)
                if method == b"HEAD" or status in (204, 304):
                    size = 0
                elif _CHUNKED.search(head):
                    dst.sendall(head)
                    reader.forward_chunked(dst)
                    continue
                else:
                    size = int(length.group(1)) if length else 0
                if status in (200, 206) and size >= self.min_body and self._armed.is_set():
                    self._armed.clear()
                    self.cuts += 1
                    dst.sendall(head + reader.take(self.keep))
                    return  # the finally closes both sides mid-body
                dst.sendall(head)
                reader.forward(size, dst)
        except (OSError, EOFError):
            pass
        finally:
            _close(src, dst)


def _close(*socks: socket.socket) -> None:
    for s in socks:
        with contextlib.suppress(OSError):
            s.shutdown(socket.SHUT_RDWR)
        s.close()
