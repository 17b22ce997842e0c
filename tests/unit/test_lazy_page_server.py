"""The lazy plan and the page server's checks, on pagemaps written here byte for byte as CRIU 4.1 writes
them and on the server end of a socketpair: the daemon side is played by the test, so a hostile request
can be sent. (Real CRIU drives the same code in tests/checkpoint/test_lazy_pages.py.)"""

from __future__ import annotations

import socket
import struct
from pathlib import Path

import pytest

from shim.checkpoint.image_check import (
    IMG_COMMON_MAGIC,
    PAGE_SIZE,
    PAGEMAP_MAGIC,
    PE_LAZY,
    PE_PARENT,
    PE_PRESENT,
    DamagedImage,
    check_image_dir,
)
from shim.checkpoint.lazy_pages import NotLazyEligible, lazy_plan, lazy_ranges
from shim.checkpoint.page_server import IOV, PS_IOV_ADD_F, PS_IOV_FLUSH_N_CLOSE, PS_IOV_GET, STATUS, PageServer

LAZY = PE_PRESENT | PE_LAZY
PID = 41


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append(n & 0x7F | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def message(fields: dict[int, int]) -> bytes:
    return b"".join(varint(k << 3) + varint(v) for k, v in fields.items())


def write_pagemap(path: Path, pages_id: int, entries: list[tuple[int, int, int]]) -> None:
    """entries: (vaddr, nr_pages, flags), written as PagemapEntry protobufs behind a PagemapHead."""
    body = [message({1: pages_id})] + [message({1: v, 2: n, 4: f}) for v, n, f in entries]
    path.write_bytes(
        struct.pack("<II", IMG_COMMON_MAGIC, PAGEMAP_MAGIC) + b"".join(struct.pack("<I", len(m)) + m for m in body)
    )


@pytest.fixture
def images(tmp_path: Path) -> Path:
    # eager 2 pages, lazy 3 pages, lazy 1 page right after it, a gap, lazy 4 pages; then a shmem pagemap
    write_pagemap(
        tmp_path / f"pagemap-{PID}.img",
        1,
        [(0x10000, 2, PE_PRESENT), (0x20000, 3, LAZY), (0x23000, 1, LAZY), (0x40000, 4, LAZY)],
    )
    write_pagemap(tmp_path / "pagemap-shmem-7.img", 2, [(0, 2, LAZY)])
    (tmp_path / "pages-1.img").write_bytes(b"".join(bytes([i]) * PAGE_SIZE for i in range(10)))
    (tmp_path / "pages-2.img").write_bytes(b"\xff" * 2 * PAGE_SIZE)
    return tmp_path


def test_lazy_ranges_are_the_lazy_entries_bytes(images: Path) -> None:
    assert lazy_ranges(images) == {"pages-1.img": [(2 * PAGE_SIZE, 8 * PAGE_SIZE)]}
    plan = lazy_plan(images)
    assert plan.total_pages == 8
    assert plan.eager_ranges("pages-1.img", 10 * PAGE_SIZE) == [(0, 2 * PAGE_SIZE)]
    # a request may cross adjacent lazy entries; the pieces are merged when the file is contiguous too
    assert plan.locate(PID, 0x22000, 2) == [("pages-1.img", 4 * PAGE_SIZE, 2 * PAGE_SIZE)]
    assert plan.locate(PID, 0x41000, 3) == [("pages-1.img", 7 * PAGE_SIZE, 3 * PAGE_SIZE)]


def test_a_checkpoint_with_parent_pages_is_not_lazy_eligible(images: Path) -> None:
    write_pagemap(images / f"pagemap-{PID}.img", 1, [(0x10000, 2, PE_PARENT), (0x20000, 3, LAZY)])
    with pytest.raises(NotLazyEligible, match="parent"):
        lazy_plan(images)


def test_check_image_dir_still_finds_a_truncated_pages_file(images: Path) -> None:
    (images / "inventory.img").write_bytes(struct.pack("<I", 0x58313116) + struct.pack("<I", 1) + b"\x08")
    check_image_dir(images)
    (images / "pages-1.img").write_bytes(b"\0" * 9 * PAGE_SIZE)
    with pytest.raises(DamagedImage, match="truncated"):
        check_image_dir(images)


class Pages:
    """The full pages file as the source; records what it was asked."""

    def __init__(self, images: Path) -> None:
        self.images, self.asked = images, list[tuple[str, int, int]]()

    def read(self, name: str, offset: int, length: int) -> bytes:
        self.asked.append((name, offset, length))
        with open(self.images / name, "rb") as f:
            f.seek(offset)
            return f.read(length)


def serve(images: Path) -> tuple[socket.socket, PageServer, list[str], Pages]:
    ours, daemon = socket.socketpair()
    failures: list[str] = []
    source = Pages(images)
    server = PageServer(ours, lazy_plan(images), source, failures.append).start()
    return daemon, server, failures, source


def recv_all(sk: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n and (chunk := sk.recv(n - len(buf))):
        buf += chunk
    return buf


def test_served_pages_are_the_pagemaps_bytes(images: Path) -> None:
    daemon, server, failures, _ = serve(images)
    daemon.sendall(IOV.pack(PS_IOV_GET, 2, 0x22000, PID))
    head = recv_all(daemon, IOV.size)
    assert IOV.unpack(head) == (PS_IOV_ADD_F | PE_PRESENT << 16, 2, 0x22000, PID)
    assert recv_all(daemon, 2 * PAGE_SIZE) == b"\x04" * PAGE_SIZE + b"\x05" * PAGE_SIZE
    daemon.sendall(IOV.pack(PS_IOV_FLUSH_N_CLOSE, 0, 0, 0))
    assert STATUS.unpack(recv_all(daemon, STATUS.size)) == (0,)
    stats = server.wait(10)
    assert (stats.pages, stats.bytes, stats.state, failures) == (2, 2 * PAGE_SIZE, "done", [])


@pytest.mark.parametrize(
    ("request_", "why"),
    [
        ((PS_IOV_GET, 1, 0x10000, PID), "not a lazy page"),  # an eager entry
        ((PS_IOV_GET, 1, 0x30000, PID), "not a lazy page"),  # in no entry
        ((PS_IOV_GET, 3, 0x43000, PID), "not a lazy page"),  # runs past the last entry
        ((PS_IOV_GET, 1, 0x20000, PID + 1), "no lazy pages for pid"),
        ((PS_IOV_GET, 0, 0x20000, PID), "bad request"),
        ((PS_IOV_GET, 0xFFFFFFFF, 0x20000, PID), "bad request"),
        ((PS_IOV_GET, 2, (1 << 64) - PAGE_SIZE, PID), "bad request"),  # wraps around
        ((PS_IOV_GET, 1, 0x20001, PID), "bad request"),  # not page aligned
        ((7 | 1 << 16, 1, 0, 7 << 8 | 2), "not a lazy page|no lazy pages"),  # shmem is never lazy
        ((1, 1, 0x20000, PID), "unexpected page server command"),  # PS_IOV_ADD: we never receive pages
    ],
)
def test_a_request_outside_the_lazy_pagemap_is_refused(images: Path, request_: tuple[int, ...], why: str) -> None:
    daemon, server, failures, source = serve(images)
    daemon.sendall(IOV.pack(*request_))
    assert recv_all(daemon, 1) == b""  # closed without an answer
    assert server.finished.wait(10) and server.stats.state == "failed"
    assert len(failures) == 1
    assert any(w in failures[0] for w in why.split("|")), failures
    assert source.asked == []


def test_a_source_failure_is_reported_before_the_connection_closes(images: Path) -> None:
    ours, daemon = socket.socketpair()
    events: list[str] = []

    class Broken:
        def read(self, name: str, offset: int, length: int) -> bytes:
            raise OSError("store unreachable")

    def on_failure(reason: str) -> None:
        daemon.setblocking(False)
        try:
            daemon.recv(1)
            events.append("closed before on_failure")
        except BlockingIOError:
            events.append(reason)  # the connection is still open: the tree can be killed first

    server = PageServer(ours, lazy_plan(images), Broken(), on_failure).start()
    daemon.sendall(IOV.pack(PS_IOV_GET, 1, 0x20000, PID))
    assert server.finished.wait(10)
    assert events == ["OSError: store unreachable"]
    daemon.setblocking(True)
    assert recv_all(daemon, 1) == b""


def test_the_daemon_hanging_up_early_is_a_failure(images: Path) -> None:
    daemon, server, failures, _ = serve(images)
    daemon.close()
    assert server.finished.wait(10)
    assert server.stats.state == "failed" and "hung up" in failures[0]
