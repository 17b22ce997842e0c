"""A TCP proxy on 127.0.0.1 in front of a real server that, once armed, cuts one HTTP response short: it
forwards the headers of the next successful response with a body of at least `min_body` bytes and `keep`
bytes of that body, then closes both sides (what a server stopped or a connection reset mid-transfer does
to the client, on demand instead of by timing)."""

from __future__ import annotations

import contextlib
import re
import socket
import threading

_SUCCESS = re.compile(rb"^HTTP/1\.1 20[06] ")
_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length: *(\d+)\r\n", re.I)


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
            threading.Thread(target=self._pump, args=(client, server, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, True), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, responses: bool) -> None:
        pending = b""  # a response's start, held until its headers are complete (armed only)
        body_left = 0  # bytes of a response passed on whole that are still to come
        inspect = responses  # off for a connection whose responses it cannot delimit (no Content-Length)
        try:
            while data := src.recv(1 << 16):
                if body_left:
                    n = min(body_left, len(data))
                    dst.sendall(data[:n])
                    body_left, data = body_left - n, data[n:]
                if not data:
                    continue
                if not (inspect and self._armed.is_set()) and not pending:
                    dst.sendall(data)  # unarmed: nothing to delimit; the next response is read from its start
                    continue
                pending += data
                end = pending.find(b"\r\n\r\n")
                if end < 0:
                    continue
                head, rest = pending[: end + 4], pending[end + 4 :]
                pending = b""
                length = _CONTENT_LENGTH.search(head)
                if length is None:
                    inspect = False
                    dst.sendall(head + rest)
                    continue
                size = int(length.group(1))
                cut = _SUCCESS.match(head) is not None and size >= self.min_body and self._armed.is_set()
                if not cut:
                    dst.sendall(head + rest[:size])
                    body_left = size - min(size, len(rest))
                    if len(rest) > size:  # a pipelined next response: not sent by HTTP/1.1 clients here
                        pending = rest[size:]
                    continue
                self._armed.clear()
                self.cuts += 1
                dst.sendall(head + rest[: self.keep])
                return  # the finally closes both sides mid-body
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()
