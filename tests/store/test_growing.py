"""A put of a directory still being written (shim.store.growing), on the file, S3 (SeaweedFS) and OCI
(registry) backends: the same chunks as a put of the finished tree, consumed ranges freed while the
producer writes, a producer failure commits nothing, a producer faster than the store (or a store
stopped and restarted) spills and completes."""

from __future__ import annotations

import os
import random
import threading
import time
from pathlib import Path

import pytest

from harness.store_util import MIB, tree_digest, wait_for_consumer
from shim.store import Chunker, open_store
from shim.store.errors import StoreError
from shim.store.growing import PUNCH_MIN, GrowingTree, TreeAborted

KEY = "default/stream/main"


@pytest.fixture(params=["file", "s3", "oci"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "file":
        return f"file://{tmp_path}/store"
    return request.getfixturevalue("s3_server" if request.param == "s3" else "oci_registry").url


def pages_tail(rel: str) -> bool:
    return rel.startswith("criu/pages-")


def page_data(rng: random.Random, mib: int) -> bytes:
    """Half random, half repetitive, like a process's pages."""
    half = mib * MIB // 2
    return (
        rng.randbytes(half) + (b"repeated-page-content-%06d\n" % rng.randrange(10**6)) * (half // 29) + bytes(half % 29)
    )


class Producer(threading.Thread):
    """Writes criu/pages-1.img in 1 MiB appends (a CRIU dump's pattern), then the small files, then says
    whether it finished; `pause` between appends makes it slower than the consumer, 0 faster. With `pace`
    it waits whenever more than that much of the image is unconsumed; `stalled` if the consumer never freed it."""

    def __init__(
        self, tree: GrowingTree, data: bytes, pause: float, fail_at: int | None = None, pace: int | None = None
    ) -> None:
        super().__init__(daemon=True)
        self.tree, self.data, self.pause, self.fail_at, self.pace = tree, data, pause, fail_at, pace
        self.stalled = False
        self.blocks_at_finish = 0

    def run(self) -> None:
        root = self.tree.root
        (root / "criu").mkdir()
        with open(root / "criu" / "pages-1.img", "wb", buffering=0) as f:
            for off in range(0, len(self.data), MIB):
                if self.fail_at is not None and off >= self.fail_at:
                    self.tree.fail(RuntimeError("criu was killed"))
                    return
                f.write(self.data[off : off + MIB])
                if self.pause:
                    time.sleep(self.pause)
                if self.pace is not None:
                    self.stalled = self.stalled or not wait_for_consumer(f.fileno(), self.pace)
        (root / "criu" / "core-1.img").write_bytes(b"core" * 500)
        (root / "criu" / "inventory.img").write_bytes(b"")
        (root / "layer.tar").write_bytes(b"layer" * 1000)
        self.blocks_at_finish = os.stat(root / "criu" / "pages-1.img").st_blocks * 512
        self.tree.finish({"dump": "done"})


@pytest.mark.parametrize("chunker", ["fastcdc:65536", "fixed:65536"])
def test_growing_put_stores_what_a_put_of_the_finished_tree_stores(
    store_url: str, tmp_path: Path, chunker: str
) -> None:
    staging = tmp_path / "staging"
    staging.mkdir()
    data = page_data(random.Random(1), 48)
    tree = GrowingTree(staging, pages_tail)
    pace = PUNCH_MIN + 2 * 2 * MIB  # the consumer punches in PUNCH_MIN steps, a read window (2 MiB) behind
    producer = Producer(tree, data, pause=0.02, pace=pace)
    store = open_store(store_url, chunker=Chunker.parse(chunker))
    producer.start()
    info = store.put_growing(KEY, tree, budget=32 * MIB)
    producer.join()
    assert info.seq == 1 and info.metadata == {"dump": "done"} and info.files == 4
    assert info.bytes_read == len(data) + 2000 + 5000

    # Consumed while the producer wrote: most of the pages image was cut before the producer finished,
    # and its consumed ranges were punched out (neither page cache nor disk holds the whole dump). The
    # producer is paced on the consumer, so this tests punching, not how fast a loaded machine consumes.
    manifest = store._load(KEY, store._committed(KEY)[1])
    assert not producer.stalled
    assert manifest.stats["streamed_bytes"] > len(data) // 2, manifest.stats
    assert producer.blocks_at_finish <= pace + MIB, producer.blocks_at_finish
    assert os.stat(staging / "criu" / "pages-1.img").st_blocks * 512 < 2 * MIB

    # Byte-identical restore, and the very chunks a plain put of the finished tree cuts.
    dest = tmp_path / "dest"
    store.get(KEY, dest)
    assert (dest / "criu" / "pages-1.img").read_bytes() == data
    plain_src = tmp_path / "plain"
    (plain_src / "criu").mkdir(parents=True)
    (plain_src / "criu" / "pages-1.img").write_bytes(data)
    (plain_src / "criu" / "core-1.img").write_bytes(b"core" * 500)
    (plain_src / "criu" / "inventory.img").write_bytes(b"")
    (plain_src / "layer.tar").write_bytes(b"layer" * 1000)
    assert tree_digest(dest / "criu") == tree_digest(plain_src / "criu")
    plain = open_store(f"file://{tmp_path}/plain-store", chunker=Chunker.parse(chunker))
    plain.put(KEY, plain_src)
    plain_manifest = plain._load(KEY, plain._committed(KEY)[1])
    chunks = {e["path"]: [tuple(c) for c in e["chunks"]] for e in manifest.entries if e["type"] == "file"}
    plain_chunks = {e["path"]: [tuple(c) for c in e["chunks"]] for e in plain_manifest.entries if e["type"] == "file"}
    assert chunks == plain_chunks


def test_a_producer_failing_midway_commits_nothing(store_url: str, tmp_path: Path) -> None:
    store = open_store(store_url)
    first = tmp_path / "first"
    first.mkdir()
    (first / "pages-1.img").write_bytes(b"previous" * 1000)
    previous = store.put(KEY, first)

    staging = tmp_path / "staging"
    staging.mkdir()
    tree = GrowingTree(staging, pages_tail)
    producer = Producer(tree, page_data(random.Random(2), 24), pause=0.01, fail_at=12 * MIB)
    producer.start()
    with pytest.raises(TreeAborted, match="criu was killed"):
        store.put_growing(KEY, tree, budget=16 * MIB)
    producer.join()
    assert [i.seq for i in store.list(KEY)] == [previous.seq]
    latest = store.latest(KEY)
    assert latest is not None and latest.seq == previous.seq
    assert not store._watcher.live("put-"), "the failed put left its lock behind"
    # The next put of the key works and comes right after the previous one.
    assert store.put(KEY, first).seq == previous.seq + 1


def test_a_producer_faster_than_the_store_spills_and_completes(store_url: str, tmp_path: Path) -> None:
    staging = tmp_path / "staging"
    staging.mkdir()
    data = page_data(random.Random(3), 128)
    tree = GrowingTree(staging, pages_tail)
    producer = Producer(tree, data, pause=0)  # no pause: appends at disk speed, faster than chunking
    store = open_store(store_url, workers=2)
    budget = 16 * MIB
    producer.start()
    info = store.put_growing(KEY, tree, budget=budget)
    producer.join()
    manifest = store._load(KEY, store._committed(KEY)[info.seq])
    assert manifest.stats["backlog_peak_bytes"] > budget, manifest.stats  # the store really fell behind
    assert os.stat(staging / "criu" / "pages-1.img").st_blocks * 512 < 2 * MIB
    dest = tmp_path / "dest"
    store.get(KEY, dest)
    assert (dest / "criu" / "pages-1.img").read_bytes() == data


def test_a_file_replaced_while_the_tree_grew_is_refused(tmp_path: Path) -> None:
    staging = tmp_path / "staging"
    (staging / "criu").mkdir(parents=True)
    tree = GrowingTree(staging, pages_tail)
    store = open_store(f"file://{tmp_path}/store")

    def produce() -> None:
        path = staging / "criu" / "pages-1.img"
        path.write_bytes(b"a" * MIB)
        time.sleep(0.5)  # the put opens it meanwhile
        path.unlink()
        path.write_bytes(b"b" * MIB)  # another inode under the same name
        tree.finish({})

    producer = threading.Thread(target=produce)
    producer.start()
    with pytest.raises(StoreError, match="replaced"):
        store.put_growing(KEY, tree, budget=16 * MIB)
    producer.join()
    assert store.list(KEY) == []


def test_the_store_stopped_and_restarted_mid_dump_spills_and_completes(s3_server, tmp_path: Path) -> None:
    """SeaweedFS's S3 gateway stopped while the producer writes: the put's uploads wait (retrying), the
    backlog grows past the budget and spills to disk, and the put completes once the store is back."""
    staging = tmp_path / "staging"
    staging.mkdir()
    data = page_data(random.Random(4), 96)
    tree = GrowingTree(staging, pages_tail)
    producer = Producer(tree, data, pause=0.01)
    # 1 MiB packs: the few packs a put buffers while uploads wait must not absorb the whole dump (16 MiB packs
    # of this 2:1 compressible data would hold ~96 MiB of it, and no backlog would ever form).
    store = open_store(s3_server.url + "&pack_mb=1")
    store.backend.retries = 10  # ride out the gateway's restart instead of giving up
    budget = 16 * MIB
    result: dict[str, object] = {}

    def put() -> None:
        try:
            result["info"] = store.put_growing(KEY, tree, budget=budget)
        except BaseException as e:
            result["error"] = e

    putter = threading.Thread(target=put)
    putter.start()
    producer.start()
    pages = staging / "criu" / "pages-1.img"
    deadline = time.monotonic() + 60
    while not (pages.exists() and pages.stat().st_size >= 4 * MIB) and time.monotonic() < deadline:
        time.sleep(0.01)
    s3_server.stop()
    try:
        # The whole dump is written while nothing can be uploaded (the packs in flight buffer a few MiB of
        # it): the backlog passes the budget however fast or slow this machine runs the producer. The uploads
        # retry meanwhile (10 attempts: about 26 s of backoff).
        producer.join(20)
    finally:
        s3_server.start()
    producer.join()
    putter.join(300)
    assert "error" not in result, result
    info = result["info"]
    manifest = store._load(KEY, store._committed(KEY)[info.seq])  # type: ignore[attr-defined]
    assert manifest.stats["backlog_peak_bytes"] > budget, manifest.stats
    assert os.stat(pages).st_blocks * 512 < 2 * MIB
    dest = tmp_path / "dest"
    store.get(KEY, dest)
    assert (dest / "criu" / "pages-1.img").read_bytes() == data
