"""Page-granular dedup in a streamed put (shim.store.growing with page_images): page images consumed while
they grow are planned page by page against the parent, exactly as a staged put of the finished tree plans
them, so an incremental streamed checkpoint uploads about the changed pages only."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from harness.store_util import tree_digest, wait_for_consumer
from shim.store import open_store
from shim.store.growing import PUNCH_MIN, GrowingTree

from .test_pages import PAGE, PATTERNS, change, make_dump, write_dump

KEY = "default/stream/main"
MIB = 1 << 20


@pytest.fixture(params=["file", "s3"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "file":
        return f"file://{tmp_path}/store"
    return request.getfixturevalue("s3_server").url


def is_page_image(rel: str) -> bool:
    return rel.startswith("criu/pages-")


class Producer(threading.Thread):
    """Copies a finished dump into a growing tree the way CRIU writes one: each page image in 256 KiB
    appends, one after the other, then the other files, then says the tree is complete. `paced`, it waits
    whenever more than PACE of the image it writes is unconsumed; `stalled` if the consumer never freed it."""

    PACE = PUNCH_MIN + (2 << 20)  # the consumer punches in PUNCH_MIN steps, a window (1 MiB here) behind

    def __init__(self, tree: GrowingTree, src: Path, paced: bool = False) -> None:
        super().__init__(daemon=True)
        self.tree, self.src, self.paced = tree, src, paced
        self.stalled = False

    def run(self) -> None:
        root = self.tree.root
        (root / "criu").mkdir()
        images = sorted((self.src / "criu").glob("pages-*.img"))
        for image in images:
            data = image.read_bytes()
            with open(root / "criu" / image.name, "wb", buffering=0) as f:
                for off in range(0, len(data), 256 << 10):
                    f.write(data[off : off + (256 << 10)])
                    if not self.paced:
                        time.sleep(0.002)
                    elif not self.stalled:
                        self.stalled = not wait_for_consumer(f.fileno(), self.PACE)
        for other in (self.src / "criu").iterdir():
            if other not in images:
                (root / "criu" / other.name).write_bytes(other.read_bytes())
        self.tree.finish({"dump": "done"})


def streamed_put(store, src: Path, staging: Path, paced: bool = False):
    staging.mkdir()
    tree = GrowingTree(staging, is_page_image)
    producer = Producer(tree, src, paced)
    producer.start()
    try:
        info = store.put_growing(KEY, tree, budget=16 * MIB, page_images=PATTERNS)
    finally:
        producer.join()
    return info, producer


def refs(manifest) -> tuple[dict, dict | None]:
    files = {
        e["path"]: (e.get("pages"), [tuple(c) for c in e["chunks"]]) for e in manifest.entries if e["type"] == "file"
    }
    return files, manifest.page_table


def test_incremental_streamed_put_uploads_the_changed_pages_as_the_staged_put_does(url: str, tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    pages = make_dump(a)
    changed_pages, changed = change(pages, 1)  # 5 % of the pages, scattered one by one

    write_dump(b, changed_pages)
    store = open_store(url)
    streamed_put(store, a, tmp_path / "staging-1")
    info, producer = streamed_put(store, b, tmp_path / "staging-2", paced=True)
    assert info.seq == 2 and info.metadata == {"dump": "done"}
    committed = store._committed(KEY)
    parent, child = store._load(KEY, committed[1]), store._load(KEY, committed[2])
    assert child.page_table is not None and all(e.get("pages") for e in child.page_files())
    # Consumed while written: the page images' read ranges were punched out while the producer wrote
    # (the large image is well beyond the producer's pace, so a consumer that never punched stalls it).
    size = sum((b / "criu" / n).stat().st_size for n in ("pages-1.img", "pages-2.img"))
    assert (b / "criu" / "pages-1.img").stat().st_size > 2 * Producer.PACE
    assert not producer.stalled
    assert child.stats["streamed_bytes"] > size // 2, child.stats

    # Bytes, not times: the data uploaded is about the changed pages (random: incompressible).
    new_tables = {d for _o, _n, d in child.page_table["chunks"]} - parent.chunk_digests()
    table = sum(len(store.backend.get_chunk(d)) for d in new_tables)
    data_uploaded = info.bytes_uploaded - table
    assert changed * PAGE <= data_uploaded <= 1.2 * changed * PAGE, (data_uploaded, changed * PAGE)

    for seq, src in ((1, a), (2, b)):
        dest = tmp_path / f"restored-{seq}"
        store.get(KEY, dest, seq=seq)
        assert tree_digest(dest) == tree_digest(src)
    assert store.verify() == []

    # The very references (and page table) a staged put of the same two finished trees makes.
    staged = open_store(f"file://{tmp_path}/staged")
    staged.put(KEY, a, page_images=PATTERNS)
    staged_info = staged.put(KEY, b, page_images=PATTERNS)
    s1, s2 = (staged._load(KEY, staged._committed(KEY)[s]) for s in (1, 2))
    assert refs(s1) == refs(parent)
    assert refs(s2) == refs(child)
    assert staged_info.bytes_uploaded == info.bytes_uploaded


def test_parent_pruned_by_gc_still_restores(url: str, tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    pages = make_dump(a)

    write_dump(b, change(pages, 1)[0])
    store = open_store(url)
    streamed_put(store, a, tmp_path / "staging-1")
    streamed_put(store, b, tmp_path / "staging-2")
    assert store.prune(KEY, keep=1) == [1]
    stats = store.gc(grace_seconds=0)
    assert stats["chunks_deleted"] > 0  # the parent's own chunks went; those the child slices stayed
    assert store.verify() == []
    store.get(KEY, tmp_path / "restored")
    assert tree_digest(tmp_path / "restored") == tree_digest(b)
    # A third, streamed, builds on the second one's page table, which points into the pruned one's chunks.
    c = tmp_path / "c"
    write_dump(c, change(pages, 1, seed=3)[0])
    third, _producer = streamed_put(store, c, tmp_path / "staging-3")
    assert third.bytes_uploaded < 0.3 * (c / "criu" / "pages-1.img").stat().st_size
    store.get(KEY, tmp_path / "restored-3")
    assert tree_digest(tmp_path / "restored-3") == tree_digest(c)


def test_without_page_images_a_streamed_put_stays_fastcdc_only(tmp_path: Path) -> None:
    """The contrast that makes the page planner's effect visible: the same incremental dump through the
    streamed put without page_images uploads several times the changed bytes."""
    a, b = tmp_path / "a", tmp_path / "b"
    pages = make_dump(a)
    changed_pages, changed = change(pages, 1)

    write_dump(b, changed_pages)
    store = open_store(f"file://{tmp_path}/store")
    for src, staging in ((a, "s1"), (b, "s2")):
        (tmp_path / staging).mkdir()
        tree = GrowingTree(tmp_path / staging, is_page_image)
        producer = Producer(tree, src)
        producer.start()
        info = store.put_growing(KEY, tree, budget=16 * MIB)
        producer.join()
    assert info.bytes_uploaded > 1.2 * changed * PAGE
    assert store._load(KEY, store._committed(KEY)[2]).page_table is None


def test_page_images_outgrowing_one_page_table_fail_the_put_and_commit_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A streamed put cannot fall back to FastCDC once it planned pages (the checkpointer streams page by
    page only where the job's size leaves room): beyond the bound it fails, and nothing is committed."""
    from shim.store import growing
    from shim.store.errors import StoreError

    a = tmp_path / "a"
    make_dump(a)
    monkeypatch.setattr(growing, "MAX_PAGE_TABLE_BYTES", 1000 * 16)  # 1000 pages; the dump has 4104
    store = open_store(f"file://{tmp_path}/store")
    with pytest.raises(StoreError, match="page table"):
        streamed_put(store, a, tmp_path / "staging")
    assert store.list(KEY) == []
