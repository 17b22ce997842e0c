"""Lazy restore, the store side: get_deferred leaves the deferred ranges as holes, DeferredReader serves them
verified (shim.store.deferred)."""

from __future__ import annotations

import json
import os
import random
import threading
import urllib.parse
from fnmatch import fnmatch
from pathlib import Path

import pytest

from harness.store_util import (
    corrupt_chunk,
    frame_manifest,
    manifest_doc,
    newest_name,
    tree_digest,
    truncate_manifest,
    write_manifest,
)
from shim.store import (
    ChunkCorrupt,
    Chunker,
    DeferredReader,
    ManifestCorrupt,
    NotDeferred,
    Store,
    StoreError,
    open_store,
)
from shim.store.replication import Copies, replicate

KEY = "default/mypod/main"
PAGE = 4096
PAGES = 1024  # a 4 MiB page image
REQUEST = 64 * PAGE  # what CRIU's lazy-pages daemon asks for at a time in its background walk
# Page runs [first, count) left for the reader: not on chunk boundaries, one page alone, up to the end.
LAZY = [(10, 280), (500, 1), (700, 324)]
PAGES_IMG = "criu/pages-1.img"


def page_content(rng: random.Random, i: int) -> bytes:
    kind = i % 4
    if kind in (0, 1):
        return rng.randbytes(PAGE)
    if kind == 2:
        return bytes(PAGE)
    line = b"page %08d of a repetitive heap\n" % i
    return (line * (PAGE // len(line) + 1))[:PAGE]


def make_dump(root: Path, seed: int = 1, pages: list[bytes] | None = None) -> list[bytes]:
    """A CRIU-like dump whose pagemap-1.img names the lazy page runs (as CRIU's pagemap would)."""
    rng = random.Random(seed)
    pages = pages or [page_content(rng, i) for i in range(PAGES)]
    (root / "criu").mkdir(parents=True, exist_ok=True)
    (root / PAGES_IMG).write_bytes(b"".join(pages))
    (root / "criu" / "pagemap-1.img").write_text(json.dumps(LAZY))
    (root / "criu" / "core-1.img").write_bytes(rng.randbytes(5000))
    (root / "rootfs-diff").mkdir()
    (root / "rootfs-diff" / "etc-hosts").write_bytes(b"127.0.0.1 localhost\n")
    return pages


def may_defer(path: str) -> bool:
    return fnmatch(path, "criu/pages-*.img")


class Defer:
    """The caller's side: reads the lazy runs from the pagemap in the partial root."""

    def __init__(self) -> None:
        self.roots: list[Path] = []

    def __call__(self, root: Path) -> dict[str, list[tuple[int, int]]]:
        self.roots.append(root)
        assert not (root / PAGES_IMG).exists(), "page images are written after defer answered"
        runs = json.loads((root / "criu" / "pagemap-1.img").read_text())
        return {PAGES_IMG: [(first * PAGE, count * PAGE) for first, count in runs]}


def lazy_bytes() -> list[tuple[int, int]]:
    return [(first * PAGE, count * PAGE) for first, count in LAZY]


def read_all(reader: DeferredReader, path: str, ranges: list[tuple[int, int]], request: int = REQUEST) -> bytes:
    out = []
    for off, length in ranges:
        for pos in range(off, off + length, request):
            out.append(reader.read(path, pos, min(request, off + length - pos)))
    return b"".join(out)


def data_in(path: Path, off: int, length: int) -> bool:
    """Whether [off, off + length) of the file has any allocated data (SEEK_DATA)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.lseek(fd, off, os.SEEK_DATA) < off + length
    except OSError:  # ENXIO: no data after off
        return False
    finally:
        os.close(fd)


def put_random_pages(tmp_path: Path, url: str, mib: int, chunk: int = 64 << 10, core: bool = False) -> bytes:
    """A checkpoint of one random page image (and a small core image) under KEY in url; its bytes."""
    src = tmp_path / "src"
    (src / "criu").mkdir(parents=True)
    data = os.urandom(mib << 20)
    (src / PAGES_IMG).write_bytes(data)
    if core:
        (src / "criu" / "core-1.img").write_bytes(os.urandom(5000))
    open_store(url, chunker=Chunker.parse(f"fixed:{chunk}")).put(KEY, src)
    return data


@pytest.fixture(params=["file", "s3"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "file":
        return f"file://{tmp_path}/store"
    return request.getfixturevalue("s3_server").url


@pytest.mark.parametrize("chunker", ["fixed:65536", "fastcdc:16384"])
def test_deferred_ranges_are_holes_and_reads_give_the_rest(url: str, tmp_path: Path, chunker: str) -> None:
    src = tmp_path / "src"
    pages = make_dump(src)
    original = b"".join(pages)
    store = open_store(url, chunker=Chunker.parse(chunker))
    store.put(KEY, src, metadata={"runtime": "runc"})
    full = tmp_path / "full"
    plain = store.get(KEY, full)

    defer = Defer()
    lazy = tmp_path / "lazy"
    progress: list[tuple[int, int]] = []
    info, reader = store.get_deferred(
        KEY, lazy, may_defer, defer, progress=lambda d, t: progress.append((d, t)), fill=False
    )
    with reader:
        assert info == plain and info.metadata == {"runtime": "runc"}
        assert [r.parent for r in defer.roots] == [tmp_path] and defer.roots[0].name.startswith(".lazy.partial-")
        assert progress[-1][0] == progress[-1][1]
        assert reader.ranges == {PAGES_IMG: lazy_bytes()}

        # Everything but the deferred ranges is byte-identical to get; those are holes.
        want, got = tree_digest(full), tree_digest(lazy)
        assert {k: v for k, v in got.items() if k != PAGES_IMG} == {k: v for k, v in want.items() if k != PAGES_IMG}
        restored = (lazy / PAGES_IMG).read_bytes()
        assert len(restored) == len(original)
        expected = bytearray(original)
        for off, length in lazy_bytes():
            expected[off : off + length] = bytes(length)
            assert not data_in(lazy / PAGES_IMG, off, length), f"deferred range at {off} was written"
        assert restored == expected
        assert data_in(lazy / PAGES_IMG, 0, 10 * PAGE)

        # The reads of every deferred range, in CRIU-sized requests, are the original bytes.
        assert read_all(reader, PAGES_IMG, lazy_bytes()) == b"".join(original[o : o + n] for o, n in lazy_bytes())
        assert reader.read(PAGES_IMG, 800 * PAGE + 17, 3) == original[800 * PAGE + 17 : 800 * PAGE + 20]
        stats = reader.stats()
        assert stats["bytes_served"] > 0 and stats["chunks_fetched"] > 0

        # Anything outside one deferred range is refused.
        for path, off, length in [
            (PAGES_IMG, 0, PAGE),  # written now, not deferred
            (PAGES_IMG, 289 * PAGE, 2 * PAGE),  # runs past a range's end
            (PAGES_IMG, 499 * PAGE, 2 * PAGE),  # starts before a range
            (PAGES_IMG, 1023 * PAGE, 2 * PAGE),  # past the file's end
            (PAGES_IMG, 10 * PAGE, 0),
            (PAGES_IMG, -1, 1),
            ("criu/core-1.img", 0, 1),
            ("criu/pages-2.img", 0, 1),
        ]:
            with pytest.raises(NotDeferred):
                reader.read(path, off, length)
    with pytest.raises(StoreError, match="closed"):
        reader.read(PAGES_IMG, 10 * PAGE, PAGE)


def test_corrupt_deferred_chunk_fails_the_read_not_the_get(url: str, tmp_path: Path) -> None:
    src = tmp_path / "src"
    original = b"".join(make_dump(src))
    store = open_store(url, chunker=Chunker.parse("fixed:65536"))
    store.put(KEY, src)
    doc = store._load(KEY, newest_name(store, KEY))
    refs = next(e["chunks"] for e in doc.entries if e["path"] == PAGES_IMG)
    # A chunk wholly inside the last deferred range (pages 700..1023) that no other chunk repeats.
    bad = next(r for r in refs if r[0] >= 704 * PAGE and r[2] != "zero" and sum(x[2] == r[2] for x in refs) == 1)
    corrupt_chunk(store, None, bad[2])
    fresh = open_store(url)
    info, reader = fresh.get_deferred(KEY, tmp_path / "lazy", may_defer, Defer(), fallback=False)
    with reader:
        assert info.seq == 1
        first = lazy_bytes()[0]
        assert read_all(reader, PAGES_IMG, [first]) == original[first[0] : first[0] + first[1]]
        with pytest.raises(ChunkCorrupt, match=bad[2]):
            read_all(reader, PAGES_IMG, [lazy_bytes()[2]])
        with pytest.raises(ChunkCorrupt, match=bad[2]):  # asked again: fetched again, refused again
            reader.read(PAGES_IMG, bad[0], PAGE)


def test_a_missing_deferred_chunk_fails_the_get(tmp_path: Path) -> None:
    """A chunk the deferred ranges need but the store does not hold is found at get_deferred, while the
    caller can still choose an older checkpoint, not when a restored job faults on it."""
    url = f"file://{tmp_path}/store?packs=0"  # loose chunk files: one can be removed behind the store's back
    src = tmp_path / "src"
    make_dump(src)
    store = open_store(url, chunker=Chunker.parse("fixed:65536"))
    store.put(KEY, src)
    doc = store._load(KEY, newest_name(store, KEY))
    refs = next(e["chunks"] for e in doc.entries if e["path"] == PAGES_IMG)
    # A chunk wholly inside the last deferred range (pages 700..1023) that no other chunk repeats.
    gone = next(r for r in refs if r[0] >= 704 * PAGE and r[2] != "zero" and sum(x[2] == r[2] for x in refs) == 1)[2]
    (tmp_path / "store" / "chunks" / gone[:2] / gone).unlink()
    with pytest.raises(ChunkCorrupt, match=rf"{gone} is missing .*\(deferred\)"):
        open_store(url).get_deferred(KEY, tmp_path / "lazy", may_defer, Defer(), fallback=False)


def test_replicas_serve_from_the_nearest_copy_and_pass_over_one_missing_a_chunk(tmp_path: Path) -> None:
    """Copies.get_deferred: the nearest copy holding the checkpoint serves it; one that lacks a deferred
    chunk is passed over before the reader is returned, its partial files gone; every copy lacking it fails."""
    src = tmp_path / "src"
    original = b"".join(make_dump(src))
    urls = [f"file://{tmp_path}/{name}?packs=0" for name in ("primary", "replica")]
    with open_store(urls[0], chunker=Chunker.parse("fixed:65536")) as p, open_store(urls[1]) as r:
        p.put(KEY, src)
        replicate(p, r, KEY)
    copies = Copies(open_store(urls[0]), [open_store(urls[1])])
    try:
        nearest, other = copies.order(KEY)
        info, reader = copies.get_deferred(KEY, tmp_path / "d1", may_defer, Defer())
        with reader:
            assert reader._store is nearest and info.seq == 1
            assert read_all(reader, PAGES_IMG, lazy_bytes()) == b"".join(original[o : o + n] for o, n in lazy_bytes())

        doc = nearest._load(KEY, newest_name(nearest, KEY))
        refs = next(e["chunks"] for e in doc.entries if e["path"] == PAGES_IMG)
        gone = next(r for r in refs if r[0] >= 704 * PAGE and r[2] != "zero" and sum(x[2] == r[2] for x in refs) == 1)
        dest = tmp_path / "d2"
        dest.mkdir(mode=0o700)  # as the Restorer's scratch: an empty directory
        Path(urllib.parse.urlparse(nearest.url).path, "chunks", gone[2][:2], gone[2]).unlink()
        info, reader = copies.get_deferred(KEY, dest, may_defer, Defer())
        with reader:
            assert reader._store is other
            assert read_all(reader, PAGES_IMG, [lazy_bytes()[2]]) == original[lazy_bytes()[2][0] :]
            reader.wait_filled(60)
        assert (dest / PAGES_IMG).read_bytes() == original

        Path(urllib.parse.urlparse(other.url).path, "chunks", gone[2][:2], gone[2]).unlink()
        dest = tmp_path / "d3"
        with pytest.raises(ChunkCorrupt, match=rf"{gone[2]} is missing"):
            copies.get_deferred(KEY, dest, may_defer, Defer())
        assert not dest.exists() or not any(dest.iterdir()), "a failed copy's files stay behind"
    finally:
        copies.close()


def test_a_restore_decodes_the_manifest_its_listing_loaded_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """newest_first hands the manifest it loaded to the get that follows; any other load reads it afresh (a
    manifest damaged since is found)."""
    src = tmp_path / "src"
    make_dump(src)
    url = f"file://{tmp_path}/store"
    open_store(url).put(KEY, src)
    store = open_store(url)
    gets: list[str] = []
    real = store.backend.get_manifest
    monkeypatch.setattr(store.backend, "get_manifest", lambda k, n: gets.append(n) or real(k, n))
    info = next(store.newest_first(KEY))
    _, reader = store.get_deferred(KEY, tmp_path / "lazy", may_defer, Defer(), seq=info.seq)
    reader.close()
    assert len(gets) == 1, gets
    store.get(KEY, tmp_path / "plain", seq=info.seq)
    assert len(gets) == 2, "a load nobody handed on reads the manifest again"
    next(store.newest_first(KEY))  # handed on again, then damaged in the store: no get but the next sees it
    truncate_manifest(store, KEY, gets[0])
    store.get(KEY, tmp_path / "handed", seq=info.seq)
    with pytest.raises(ManifestCorrupt):
        store.get(KEY, tmp_path / "again", seq=info.seq, fallback=False)


def test_encrypted_store(url: str, tmp_path: Path) -> None:
    key = tmp_path / "k"
    fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, os.urandom(32))
    os.close(fd)
    src = tmp_path / "src"
    original = b"".join(make_dump(src))
    open_store(url, key_files=[key]).put(KEY, src)
    with pytest.raises(StoreError):  # without its key nothing is read
        open_store(url).get_deferred(KEY, tmp_path / "nokey", may_defer, Defer())
    _info, reader = open_store(url, key_files=[key]).get_deferred(KEY, tmp_path / "lazy", may_defer, Defer())
    with reader:
        assert read_all(reader, PAGES_IMG, lazy_bytes()) == b"".join(original[o : o + n] for o, n in lazy_bytes())
        assert reader.stats()["open_ms"] > 0  # chunks were opened (decrypted)


def test_page_planner_incremental_checkpoint(url: str, tmp_path: Path) -> None:
    """Second put dedups page by page against the first: its page image is slices of the parent's chunks."""
    pages = make_dump(tmp_path / "a")
    rng = random.Random(5)
    changed = list(pages)
    for i in rng.sample(range(PAGES), 40):
        changed[i] = rng.randbytes(PAGE)
    make_dump(tmp_path / "b", pages=changed)
    store = open_store(url)
    store.put(KEY, tmp_path / "a", page_images=["criu/pages-*.img"])
    info2 = store.put(KEY, tmp_path / "b", page_images=["criu/pages-*.img"])
    m = store._load(KEY, newest_name(store, KEY))
    assert any(len(r) == 5 for e in m.entries if e["path"] == PAGES_IMG for r in e["chunks"])
    info, reader = open_store(url).get_deferred(KEY, tmp_path / "lazy", may_defer, Defer())
    with reader:
        assert info.seq == info2.seq == 2
        original = b"".join(changed)
        assert read_all(reader, PAGES_IMG, lazy_bytes()) == b"".join(original[o : o + n] for o, n in lazy_bytes())
    full = tmp_path / "full"
    store.get(KEY, full)
    restored = (tmp_path / "lazy" / PAGES_IMG).read_bytes()
    for off, length in lazy_bytes():
        restored = restored[:off] + original[off : off + length] + restored[off + length :]
    assert restored == (full / PAGES_IMG).read_bytes()


def test_the_fill_stays_within_its_bound_and_writes_every_byte(tmp_path: Path) -> None:
    """An 8 MiB deferred file with a 1 MiB bound: the background fill holds at most the bound in flight,
    fetches each chunk once and writes the whole file; reads then come from it without a fetch."""
    url = f"file://{tmp_path}/store"
    chunk = 64 << 10
    data = put_random_pages(tmp_path, url, 8, chunk)
    limit = 1 << 20

    def whole(_root: Path) -> dict[str, list[tuple[int, int]]]:
        return {PAGES_IMG: [(0, len(data))]}

    store = open_store(url, workers=4)
    _info, reader = store.get_deferred(KEY, tmp_path / "lazy", may_defer, whole, memory_limit=limit)
    with reader:
        assert reader.wait_filled(60)
        assert (tmp_path / "lazy" / PAGES_IMG).read_bytes() == data
        assert read_all(reader, PAGES_IMG, [(0, len(data))], request=16 * PAGE) == data
        stats = reader.stats()
    assert 0 < stats["held_peak"] <= limit, stats
    assert stats["chunks_fetched"] == len(data) // chunk, stats  # each chunk once
    assert stats["claimed_by_fill"] == len(data) // chunk and stats["claimed_by_reads"] == 0, stats
    assert reader.stats()["held_bytes"] == 0
    assert not any(t.name.startswith("revenant-lazy") for t in threading.enumerate()), "close stops the fill"


def test_a_read_does_not_wait_for_the_fill(tmp_path: Path) -> None:
    """A read far ahead of the fill (a task faulting on a page at the end) fetches its chunk itself."""
    url = f"file://{tmp_path}/store"
    data = put_random_pages(tmp_path, url, 8)
    store = open_store(url, workers=1)
    whole = {PAGES_IMG: [(0, len(data))]}
    # A 64 KiB bound: the fill has one chunk in flight at a time, far behind the last page.
    _info, reader = store.get_deferred(KEY, tmp_path / "lazy", may_defer, lambda _r: whole, memory_limit=64 << 10)
    with reader:
        assert reader.read(PAGES_IMG, len(data) - PAGE, PAGE) == data[-PAGE:]
        assert reader.stats()["claimed_by_reads"] >= 1
        assert reader.wait_filled(60)
        assert (tmp_path / "lazy" / PAGES_IMG).read_bytes() == data


def test_a_fill_started_later_fills_nothing_before(tmp_path: Path) -> None:
    """fill_later: reads fetch what they need, the background fill starts at start_fill (the restored job
    runs), and a reader closed before that closes cleanly."""
    url = f"file://{tmp_path}/store"
    data = put_random_pages(tmp_path, url, 4)
    whole = {PAGES_IMG: [(0, len(data))]}
    store = open_store(url)
    _info, reader = store.get_deferred(KEY, tmp_path / "lazy", may_defer, lambda _r: whole, fill_later=True)
    with reader:
        assert reader.read(PAGES_IMG, PAGE, PAGE) == data[PAGE : 2 * PAGE]
        assert not reader.wait_filled(0.5)
        stats = reader.stats()
        assert stats["claimed_by_fill"] == 0 and stats["claimed_by_reads"] == 1, stats
        reader.start_fill()
        reader.start_fill()  # once is enough
        assert reader.wait_filled(60)
        assert (tmp_path / "lazy" / PAGES_IMG).read_bytes() == data
    _info, reader = store.get_deferred(KEY, tmp_path / "lazy2", may_defer, lambda _r: whole, fill_later=True)
    reader.close()
    reader.start_fill()  # closed: ignored
    assert not reader.wait_filled(0)


def test_concurrent_reads_while_reading_ahead(tmp_path: Path) -> None:
    src = tmp_path / "src"
    original = b"".join(make_dump(src))
    url = f"file://{tmp_path}/store"
    open_store(url, chunker=Chunker.parse("fastcdc:16384")).put(KEY, src)
    _info, reader = open_store(url).get_deferred(KEY, tmp_path / "lazy", may_defer, Defer(), memory_limit=256 << 10)
    results: dict[int, tuple[bool, bytes]] = {}

    def walk(i: int, rng: random.Random) -> None:
        """Faulting pages first, anywhere, then the background walk, as CRIU's lazy-pages daemon does."""
        faults = [(o + PAGE * rng.randrange(n // PAGE), PAGE) for o, n in lazy_bytes() * 3]
        ok = all(reader.read(PAGES_IMG, o, n) == original[o : o + n] for o, n in faults)
        results[i] = ok, read_all(reader, PAGES_IMG, lazy_bytes(), request=PAGE * rng.randint(1, 64))

    with reader:
        threads = [threading.Thread(target=walk, args=(i, random.Random(i))) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    whole = b"".join(original[o : o + n] for o, n in lazy_bytes())
    assert sorted(results) == [0, 1, 2, 3] and all(r == (True, whole) for r in results.values())


@pytest.mark.parametrize(
    "answer, error",
    [
        ({"criu/core-1.img": [(0, 10)]}, "not a file that may be deferred"),
        ({PAGES_IMG: [(PAGES * PAGE - 10, 11)]}, "outside"),
        ({PAGES_IMG: [(-1, 10)]}, "outside"),
        ({PAGES_IMG: [(0, 0)]}, "outside"),
        ({PAGES_IMG: [(0, "10")]}, "outside"),
        ({PAGES_IMG: [(0,)]}, "not \\(offset, length\\)"),
    ],
)
def test_bad_defer_answer_refused(tmp_path: Path, answer: dict, error: str) -> None:
    src = tmp_path / "src"
    make_dump(src)
    store = open_store(f"file://{tmp_path}/store")
    store.put(KEY, src)
    with pytest.raises(StoreError, match=error):
        store.get_deferred(KEY, tmp_path / "lazy", may_defer, lambda _root: answer)
    assert sorted(os.listdir(tmp_path)) == ["src", "store"], "the partial tree is removed"


def test_overlapping_ranges_merge_and_nothing_deferred_is_a_plain_get(tmp_path: Path) -> None:
    src = tmp_path / "src"
    original = b"".join(make_dump(src))
    store = open_store(f"file://{tmp_path}/store")
    store.put(KEY, src)
    ranges = [(PAGE, 3 * PAGE), (2 * PAGE, 4 * PAGE), (6 * PAGE, PAGE)]
    _i, reader = store.get_deferred(KEY, tmp_path / "lazy", may_defer, lambda _r: {PAGES_IMG: ranges})
    with reader:
        assert reader.ranges == {PAGES_IMG: [(PAGE, 6 * PAGE)]}
        assert reader.read(PAGES_IMG, PAGE, 6 * PAGE) == original[PAGE : 7 * PAGE]
    _i, reader = store.get_deferred(KEY, tmp_path / "none", may_defer, lambda _r: {})
    with reader:
        assert reader.ranges == {}
        assert (tmp_path / "none" / PAGES_IMG).read_bytes() == original


def count_ranged_gets(store: Store) -> list[tuple[str, int, int]]:
    """The (object, offset, length) of every ranged GET the store's S3 backend makes from now on."""
    ranges: list[tuple[str, int, int]] = []
    get_range = store.backend.get_range

    def counting(name: str, offset: int, length: int) -> bytes:
        ranges.append((name, offset, length))
        return get_range(name, offset, length)

    store.backend.get_range = counting  # type: ignore[attr-defined]
    return ranges


def test_s3_reads_go_through_planned_pack_windows(s3_server, tmp_path: Path) -> None:
    """The reader's chunks of a packed S3 store come from the pack windows its plan names (one ranged GET per
    8 MiB window), not a GET per chunk, also where get_deferred had fetched a window for other files."""
    data = put_random_pages(tmp_path, s3_server.url, 6, 16384, core=True)
    store = open_store(s3_server.url)
    ranges = count_ranged_gets(store)
    # The first 64 KiB are written now: their window is fetched for them (and the small file) first.
    _info, reader = store.get_deferred(
        KEY, tmp_path / "lazy", may_defer, lambda _r: {PAGES_IMG: [(64 << 10, len(data) - (64 << 10))]}
    )
    with reader:
        before = len(ranges)
        assert reader.wait_filled(60)  # the fill reads in the planned order: through the pack's windows
        assert read_all(reader, PAGES_IMG, reader.ranges[PAGES_IMG]) == data[64 << 10 :]
    assert before >= 1 and len(ranges) - before <= 2, ranges  # 6 MiB of 16 KiB chunks: one window, maybe two


def test_a_read_ahead_of_the_fill_gets_its_chunk_alone(s3_server, tmp_path: Path) -> None:
    """A read (a page fault) far from where the fill is fetches its one chunk with one ranged GET of just
    that chunk's bytes: not the 8 MiB read window around it, and no planned read-ahead from there."""
    data = put_random_pages(tmp_path, s3_server.url, 6, 16384)
    store = open_store(s3_server.url)
    ranges = count_ranged_gets(store)
    whole = {PAGES_IMG: [(0, len(data))]}
    _info, reader = store.get_deferred(KEY, tmp_path / "lazy", may_defer, lambda _r: whole, fill=False)
    with reader:
        before = len(ranges)
        assert reader.read(PAGES_IMG, (5 << 20) + 3 * PAGE, PAGE) == data[(5 << 20) + 3 * PAGE : (5 << 20) + 4 * PAGE]
        (one,) = ranges[before:]
        assert one[2] <= (16 << 10) + 1, one  # the chunk as stored (raw + its 1-byte header), not a window


def test_v1_manifest_with_overlapping_references_refused(tmp_path: Path) -> None:
    """A v1 manifest may list a file's references in any order (get writes them all); a deferred file's must
    be ordered and disjoint, or which chunk a deferred byte comes from is ambiguous: refused, nothing left."""
    src = tmp_path / "src"
    make_dump(src)
    store = open_store(f"file://{tmp_path}/store", chunker=Chunker.parse("fixed:65536"))
    store.put(KEY, src)
    doc = manifest_doc(store, KEY, newest_name(store, KEY))
    entry = next(e for e in doc["entries"] if e["path"] == PAGES_IMG)
    entry["chunks"].insert(1, list(entry["chunks"][0]))  # chunk 0 twice: overlapping
    write_manifest(store, KEY, 2, frame_manifest(json.dumps({**doc, "seq": 2}).encode()))
    store.get(KEY, tmp_path / "plain", seq=2)  # valid v1: get writes the same bytes twice
    with pytest.raises(ManifestCorrupt, match="overlaps"):
        store.get_deferred(KEY, tmp_path / "lazy", may_defer, Defer(), seq=2)
    assert not (tmp_path / "lazy").exists()
    info, reader = store.get_deferred(KEY, tmp_path / "fallback", may_defer, Defer())  # falls back to seq 1
    with reader:
        assert info.seq == 1
