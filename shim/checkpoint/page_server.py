"""A CRIU page server that answers a lazy restore's page requests from a verified source.

`criu lazy-pages --page-server --ps-socket FD` asks for the lazy pages of a restored tree as its tasks
fault on them (and then, in the background, for all the rest). Stock `criu page-server` can only serve
a lazy dump's live memory, so the shim serves the checkpoint's own pages files, read through a
`PageSource` that verifies every byte (the store). The wire format is CRIU 4.1's (criu/page-xfer.c):

    request  struct page_server_iov { u32 cmd; u32 nr_pages; u64 vaddr; u64 dst_id; }  (24 bytes, LE)
             cmd = PS_IOV_GET (7), dst_id = the task's pid in the images (no type bits, unlike a dump's
             dst_id; seen on the wire from CRIU 4.1.1)
    answer   the same header with cmd = PS_IOV_ADD_F | PE_PRESENT << 16, then nr_pages * 4096 bytes
    end      PS_IOV_FLUSH (0x1023) or PS_IOV_FLUSH_N_CLOSE (0x1024, sent over --ps-socket): answered
             with an s32 status 0

Every request is outside input: it must name a pid and pages the pagemap lists as lazy.

If the daemon's userfaultfd goes away, the kernel lets the tasks fault in zero pages and run on with
them. So on any failure (a source error, a bad request, the daemon hanging up before its final flush)
the server calls `on_failure(reason)` first, which must kill the restored tree, and only then closes
the connection.
"""

from __future__ import annotations

import logging
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from shim.progress import Summary

from .image_check import PAGE_SIZE, PE_PRESENT
from .lazy_pages import BadPageRequest, LazyPlan

log = logging.getLogger(__name__)

IOV = struct.Struct("<IIQQ")
STATUS = struct.Struct("<i")
PS_IOV_ADD_F = 6
PS_IOV_GET = 7
PS_IOV_FLUSH = 0x1023
PS_IOV_FLUSH_N_CLOSE = 0x1024
PS_CMD_MASK = 0xFFFF


class PageSource(Protocol):
    def read(self, name: str, offset: int, length: int) -> bytes:
        """Verified bytes [offset, offset+length) of image file `name`; may block; raises on failure."""
        ...


class PageServerError(RuntimeError):
    """The page server stopped before the lazy-pages daemon had all its pages."""


@dataclass
class PageServerStats:
    requests: int = 0
    pages: int = 0
    bytes: int = 0
    state: str = "serving"  # serving | done | failed
    reason: str = ""


class PageServer:
    """Serves one lazy-pages daemon connection; `run()` blocks (start it in a thread with `start()`)."""

    def __init__(
        self,
        sock: socket.socket,
        plan: LazyPlan,
        source: PageSource,
        on_failure: Callable[[str], None],
        progress: Callable[[int, int], None] | None = None,
    ) -> None:
        self._sock = sock
        self._plan = plan
        self._source = source
        self._on_failure = on_failure
        self._progress = progress
        self._thread: threading.Thread | None = None
        self.stats = PageServerStats()
        self.finished = threading.Event()

    def start(self) -> PageServer:
        self._thread = threading.Thread(target=self.run, name="lazy-page-server", daemon=True)
        self._thread.start()
        return self

    def wait(self, timeout: float | None = None) -> PageServerStats:
        """Wait for the end of the session; raise PageServerError when it failed."""
        if not self.finished.wait(timeout):
            raise TimeoutError(f"page server still serving after {timeout}s")
        if self.stats.state != "done":
            raise PageServerError(self.stats.reason)
        return self.stats

    def run(self) -> None:
        start = time.monotonic()
        try:
            self._serve()
            self.stats.state = "done"
        except BaseException as e:  # whatever broke, the restored tree must not run on
            self.stats.state, self.stats.reason = "failed", f"{type(e).__name__}: {e}"
            log.error("lazy page server failed: %s", self.stats.reason)
            try:
                self._on_failure(self.stats.reason)
            except Exception:
                log.exception("on_failure of the lazy page server raised")
        finally:
            self._sock.close()
            summary = Summary("lazy pages served", self.stats.bytes, time.monotonic() - start)
            log.info(
                "%s; %d requests, %d of %d pages, %s",
                summary.text(),
                self.stats.requests,
                self.stats.pages,
                self._plan.total_pages,
                self.stats.state,
                extra={"fields": {**summary.fields(), "requests": self.stats.requests, "state": self.stats.state}},
            )
            self.finished.set()

    def _serve(self) -> None:
        while True:
            header = self._recv_exact(IOV.size)
            if header is None:
                raise PageServerError("the lazy-pages daemon hung up before its final flush")
            cmd, nr_pages, vaddr, dst_id = IOV.unpack(header)
            op = cmd & PS_CMD_MASK
            if op == PS_IOV_GET:
                self._answer(nr_pages, vaddr, dst_id)
            elif op in (PS_IOV_FLUSH, PS_IOV_FLUSH_N_CLOSE):
                self._sock.sendall(STATUS.pack(0))
                if op == PS_IOV_FLUSH:
                    self._recv_exact(1)  # the daemon closes its end; wait for it as CRIU's server does
                return
            else:
                raise BadPageRequest(f"unexpected page server command {cmd:#x}")

    def _answer(self, nr_pages: int, vaddr: int, dst_id: int) -> None:
        pieces = self._plan.locate(dst_id, vaddr, nr_pages)  # unknown pids are refused there
        data = b"".join(self._checked_read(name, offset, length) for name, offset, length in pieces)
        self._sock.sendall(IOV.pack(PS_IOV_ADD_F | PE_PRESENT << 16, nr_pages, vaddr, dst_id) + data)
        self.stats.requests += 1
        self.stats.pages += nr_pages
        self.stats.bytes += len(data)
        if self._progress is not None:
            self._progress(self.stats.bytes, self._plan.total_pages * PAGE_SIZE)

    def _checked_read(self, name: str, offset: int, length: int) -> bytes:
        data = self._source.read(name, offset, length)
        if len(data) != length:
            raise PageServerError(f"{name}: source gave {len(data)} bytes at {offset}, {length} asked")
        return data

    def _recv_exact(self, n: int) -> bytes | None:
        """n bytes, or None on a clean end of stream before the first byte."""
        buf = bytearray()
        while len(buf) < n:
            chunk = self._sock.recv(n - len(buf))
            if not chunk:
                if not buf:
                    return None
                raise PageServerError(f"the lazy-pages daemon hung up mid-message ({len(buf)} of {n} bytes)")
            buf += chunk
        return bytes(buf)
