"""Page-granular incremental checkpoints: page images dedup page by page against the key's parent."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

from harness.store_util import frame_manifest, manifest_doc, newest_name, tree_digest, write_manifest
from shim.store import BackendUnavailable, ChunkCorrupt, ManifestCorrupt, open_store
from shim.store import model as store_model
from shim.store import pages as pages_mod
from shim.store.model import FORMAT, FORMAT_V2, ZERO, Manifest, validate_manifest_doc
from shim.store.pages import ZERO_PAGE_HASH, _zero_runs, page_hashes

KEY = "default/mypod/main"
PAGE = 4096
MIB = 1 << 20
PAGES = 4096  # a 16 MiB page image
PATTERNS = ("criu/pages-*.img",)


@pytest.fixture(params=["file", "s3"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "file":
        return f"file://{tmp_path}/store"
    return request.getfixturevalue("s3_server").url


def page_content(rng: random.Random, i: int) -> bytes:
    """Half random pages, a quarter zero, a quarter text that differs per page (compressible)."""
    kind = i % 4
    if kind in (0, 1):
        return rng.randbytes(PAGE)
    if kind == 2:
        return bytes(PAGE)
    line = b"page %08d of a repetitive heap\n" % i
    return (line * (PAGE // len(line) + 1))[:PAGE]


def make_dump(root: Path, seed: int = 1) -> list[bytes]:
    rng = random.Random(seed)
    pages = [page_content(rng, i) for i in range(PAGES)]
    write_dump(root, pages)
    return pages


def write_dump(root: Path, pages: list[bytes]) -> None:
    (root / "criu").mkdir(parents=True, exist_ok=True)
    (root / "criu" / "pages-1.img").write_bytes(b"".join(pages))
    (root / "criu" / "core-1.img").write_bytes(b"core" * 300)
    (root / "criu" / "pages-2.img").write_bytes(b"".join(pages[:8]) + b"short tail")  # not page-sized


def change(pages: list[bytes], run: int, seed: int = 2) -> tuple[list[bytes], int]:
    """A copy with 5 % of the non-zero pages rewritten with random data, in runs of `run` pages."""
    rng = random.Random(seed)
    out = list(pages)
    starts = rng.sample(range(0, PAGES - run, run), int(PAGES * 0.05) // run)
    changed = 0
    for s in starts:
        for i in range(s, s + run):
            out[i] = rng.randbytes(PAGE)
            changed += 1
    return out, changed


def second_put(tmp_path: Path, url: str, run: int, shift: int = 0, **kw) -> tuple[int, int, int, Path, Path]:
    """(bytes the second put uploaded for data, changed pages, bytes it uploaded for its page table, first
    and second dump). Table chunks whose hashes did not change are shared with the parent's table."""
    a, b = tmp_path / "a", tmp_path / "b"
    pages = make_dump(a)
    changed_pages, changed = change(pages, run)
    # shift: a mapping grew by whole pages before the data, so every later page moves
    write_dump(b, [os.urandom(PAGE) for _ in range(shift)] + changed_pages)
    store = open_store(url, **kw)
    store.put(KEY, a, page_images=PATTERNS)
    info = store.put(KEY, b, page_images=PATTERNS)
    committed = store._committed(KEY)
    parent, child = store._load(KEY, committed[1]), store._load(KEY, committed[2])
    assert child.page_table is not None
    new_tables = {d for _o, _n, d in child.page_table["chunks"]} - parent.chunk_digests()
    table = sum(len(store.backend.get_chunk(d)) for d in new_tables)
    return info.bytes_uploaded - table, changed + shift, table, a, b


@pytest.mark.parametrize("run", [1, 64], ids=["scattered", "runs"])
def test_changed_pages_cost_about_one_page_each(url: str, tmp_path: Path, run: int) -> None:
    uploaded, changed, table, a, b = second_put(tmp_path, url, run)
    budget = 1.03 * changed * PAGE + 8 * 1024  # chunk framing and the changed short tail page on top
    assert changed * PAGE <= uploaded <= budget, (uploaded, changed * PAGE)  # random pages: incompressible
    assert table <= 0.005 * PAGES * PAGE  # 16 bytes a page at most
    # The same two dumps through FastCDC alone (no page_images) cost more than that budget, table or not:
    # 1.13x the changed bytes for these runs, 9x for scattered pages.
    cdc = open_store(f"file://{tmp_path}/cdc")
    cdc.put(KEY, a)
    assert cdc.put(KEY, b).bytes_uploaded > budget
    store = open_store(url)
    for seq, src in ((1, a), (2, b)):
        dest = tmp_path / f"restored-{seq}"
        store.get(KEY, dest, seq=seq)
        assert tree_digest(dest) == tree_digest(src)
    assert store.verify() == []


def test_shifted_mapping_still_dedups(url: str, tmp_path: Path) -> None:
    uploaded, changed, _table, _a, b = second_put(tmp_path, url, 1, shift=3)
    assert uploaded <= 1.03 * changed * PAGE + 8 * 1024, (uploaded, changed * PAGE)
    store = open_store(url)
    store.get(KEY, tmp_path / "restored")
    assert tree_digest(tmp_path / "restored") == tree_digest(b)
    doc = manifest_doc(store, KEY, newest_name(store, KEY))
    assert doc["format"] == FORMAT_V2
    refs = [r for e in doc["entries"] if e.get("pages") for r in e["chunks"]]
    assert any(len(r) == 5 for r in refs)  # slices of the parent's chunks, at shifted offsets


def test_prune_parent_then_gc_keeps_child_whole(url: str, tmp_path: Path) -> None:
    _uploaded, _changed, _table, _a, b = second_put(tmp_path, url, 1)
    store = open_store(url)
    assert store.prune(KEY, keep=1) == [1]
    stats = store.gc(grace_seconds=0)
    assert stats["chunks_deleted"] > 0  # the parent's own chunks went; those the child slices stayed
    assert store.verify() == []
    store.get(KEY, tmp_path / "restored")
    assert tree_digest(tmp_path / "restored") == tree_digest(b)
    # A third checkpoint builds on the second one's table, which points into the pruned one's chunks.
    c = tmp_path / "c"
    write_dump(c, change(make_dump(tmp_path / "scratch"), 1, seed=3)[0])
    third = store.put(KEY, c, page_images=PATTERNS)
    assert third.bytes_uploaded < 0.3 * (c / "criu" / "pages-1.img").stat().st_size
    store.get(KEY, tmp_path / "restored-3")
    assert tree_digest(tmp_path / "restored-3") == tree_digest(c)


def test_encrypted_store(tmp_path: Path, url: str) -> None:
    key = tmp_path / "k"
    fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, os.urandom(32))
    os.close(fd)
    uploaded, changed, _table, _a, b = second_put(tmp_path, url, 1, key_files=[key])
    assert uploaded <= 1.03 * changed * PAGE + 32 * 1024, (uploaded, changed * PAGE)  # a seal per chunk on top
    store = open_store(url, key_files=[key])
    store.get(KEY, tmp_path / "restored")
    assert tree_digest(tmp_path / "restored") == tree_digest(b)
    assert store.verify() == []


def test_parent_without_page_table_and_files_not_matching(tmp_path: Path) -> None:
    """A v1 parent (no page_images) is read as before; with no matching file the manifest stays v1."""
    store = open_store(f"file://{tmp_path}/store")
    a = tmp_path / "a"
    pages = make_dump(a)
    store.put(KEY, a)
    assert manifest_doc(store, KEY, newest_name(store, KEY))["format"] == FORMAT
    store.put(KEY, a, page_images=("nothing-*.img",))
    assert manifest_doc(store, KEY, newest_name(store, KEY))["format"] == FORMAT
    write_dump(tmp_path / "b", change(pages, 1)[0])
    info = store.put(KEY, tmp_path / "b", page_images=PATTERNS)
    assert info.bytes_uploaded > 0.3 * PAGES * PAGE  # nothing to look pages up in yet
    store.get(KEY, tmp_path / "restored")
    assert tree_digest(tmp_path / "restored") == tree_digest(tmp_path / "b")


# ------------------------------------------------------------------ hostile manifests


def v2_doc(tmp_path: Path) -> tuple[object, dict]:
    store = open_store(f"file://{tmp_path}/store")
    second_put(tmp_path, f"file://{tmp_path}/store", 1)
    return store, manifest_doc(store, KEY, newest_name(store, KEY))


def first_slice(doc: dict) -> list:
    for e in doc["entries"]:
        for r in e.get("chunks", []):
            if len(r) == 5:
                return r
    raise AssertionError("no slice reference")


def page_entry(doc: dict) -> dict:
    return next(e for e in doc["entries"] if e.get("pages") and len(e["chunks"]) > 3)


def forge(doc: dict, how) -> dict:
    doc = json.loads(json.dumps(doc))
    how(doc)
    return doc


HOSTILE = {
    "slice beyond its chunk": lambda d: first_slice(d).__setitem__(3, first_slice(d)[4]),
    "negative slice offset": lambda d: first_slice(d).__setitem__(3, -4096),
    "chunk length over the limit": lambda d: first_slice(d).__setitem__(4, store_model.MAX_CHUNK_LEN + 1),
    "one chunk, two lengths": lambda d: first_slice(d).__setitem__(4, first_slice(d)[4] + 4096),
    "overlapping references": lambda d: page_entry(d)["chunks"][1].__setitem__(0, page_entry(d)["chunks"][0][0]),
    "references out of order": lambda d: page_entry(d)["chunks"].reverse(),
    "slice of zero": lambda d: page_entry(d)["chunks"].__setitem__(0, [*page_entry(d)["chunks"][0][:2], "zero", 0, 8]),
    "4-element reference": lambda d: first_slice(d).pop(),
    "slices in a v1 manifest": lambda d: d.__setitem__("format", FORMAT),
    "pages flag not true": lambda d: page_entry(d).__setitem__("pages", 1),
    "page table size off": lambda d: d["page_table"].__setitem__("size", d["page_table"]["size"] + 16),
    "page table of another hash": lambda d: d["page_table"].__setitem__("hash", "md5"),
    "page table slice": lambda d: d["page_table"]["chunks"][0].extend([0, 1 << 20]),
    "page table too large": lambda d: d["page_table"].__setitem__("size", store_model.MAX_PAGE_TABLE_BYTES + 16),
    "page table missing": lambda d: d.pop("page_table"),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_manifest_refused(tmp_path: Path, name: str) -> None:
    store, doc = v2_doc(tmp_path)
    validate_manifest_doc(doc)  # the real one passes
    bad = forge(doc, HOSTILE[name])
    with pytest.raises(ManifestCorrupt):
        validate_manifest_doc(bad)
    # Through the store too: the forged checkpoint is refused and a restore falls back to seq 2.
    write_manifest(store, KEY, 3, frame_manifest(json.dumps({**bad, "seq": 3}).encode()))
    with pytest.raises(ManifestCorrupt):
        store.get(KEY, tmp_path / "refused", seq=3)
    assert store.get(KEY, tmp_path / "fallback").seq == 2


def test_huge_reference_counts_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _store, doc = v2_doc(tmp_path)
    refs = sum(len(e.get("chunks", [])) for e in doc["entries"])
    monkeypatch.setattr(store_model, "MAX_CHUNK_REFS", refs - 1)
    with pytest.raises(ManifestCorrupt, match="more than"):
        validate_manifest_doc(doc)


def test_slice_lying_about_its_chunk_length_fails_restore(tmp_path: Path) -> None:
    """A well-formed manifest whose slice claims a longer chunk than the stored one: the chunk fails its
    check on restore (ChunkCorrupt), nothing is written from it."""
    store, doc = v2_doc(tmp_path)
    s = first_slice(doc)
    for e in doc["entries"]:
        for r in e.get("chunks", []):
            if len(r) == 5 and r[2] == s[2]:
                r[4] += 4096
    for r in doc["page_table"]["chunks"]:
        assert r[2] != s[2]
    validate_manifest_doc(doc)
    write_manifest(store, KEY, 3, frame_manifest(json.dumps({**doc, "seq": 3}).encode()))
    with pytest.raises(ChunkCorrupt):
        store.get(KEY, tmp_path / "refused", seq=3, fallback=False)
    assert not (tmp_path / "refused").exists()


def test_chunk_digests_count_slices_and_table(tmp_path: Path) -> None:
    _store, doc = v2_doc(tmp_path)
    m: Manifest = validate_manifest_doc(doc)
    digests = m.chunk_digests()
    assert first_slice(doc)[2] in digests
    assert all(r[2] in digests for r in doc["page_table"]["chunks"])


@pytest.mark.parametrize("cache_bytes", [None, 0], ids=["cache", "no-cache"])
def test_restore_fetches_each_sliced_chunk_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cache_bytes: int | None
) -> None:
    """Once even when no chunk stays cached (a file larger than the cache slices a chunk all over itself)."""
    if cache_bytes is not None:
        from shim.store import store as store_module
        from shim.store.chunkcache import ChunkCache

        monkeypatch.setattr(store_module, "ChunkCache", lambda: ChunkCache(limit=cache_bytes))
    url = f"file://{tmp_path}/store"
    second_put(tmp_path, url, 1)
    store = open_store(url)
    doc = manifest_doc(store, KEY, newest_name(store, KEY))
    sliced = [r[2] for e in doc["entries"] for r in e.get("chunks", []) if len(r) == 5]
    assert len(sliced) > len(set(sliced))  # chunks shared by several slices
    fetched: list[str] = []
    get_chunk = store.backend.get_chunk

    def counting(digest: str) -> bytes:
        fetched.append(digest)
        return get_chunk(digest)

    store.backend.get_chunk = counting  # type: ignore[method-assign]
    store.get(KEY, tmp_path / "restored")
    assert tree_digest(tmp_path / "restored") == tree_digest(tmp_path / "b")
    if cache_bytes is None:
        assert len(fetched) == len(set(fetched))
    else:  # once per file that uses it (pages-2.img repeats pages of pages-1.img), however spread its slices
        assert len(fetched) == sum(len({r[2] for r in e.get("chunks", []) if r[2] != "zero"}) for e in doc["entries"])


def test_page_images_beyond_one_table_fall_back_to_fastcdc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from shim.store import pages

    monkeypatch.setattr(pages, "MAX_PAGE_TABLE_BYTES", PAGES * 16 - 16)
    store = open_store(f"file://{tmp_path}/store")
    make_dump(tmp_path / "a")
    store.put(KEY, tmp_path / "a", page_images=PATTERNS)
    assert manifest_doc(store, KEY, newest_name(store, KEY))["format"] == FORMAT
    store.get(KEY, tmp_path / "restored")
    assert tree_digest(tmp_path / "restored") == tree_digest(tmp_path / "a")


def test_cli_put_page_images(tmp_path: Path) -> None:
    import subprocess
    import sys

    url = f"file://{tmp_path}/store"
    a, b = tmp_path / "a", tmp_path / "b"
    pages = make_dump(a)
    write_dump(b, change(pages, 1)[0])
    exe = str(Path(sys.executable).parent / "revenant")
    for src in (a, b):
        argv = [exe, "store", "put", "--store", url, "--key", KEY, "--json", "--page-images", PATTERNS[0], str(src)]
        p = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["bytes_uploaded"] < 0.1 * PAGES * PAGE
    store = open_store(url)
    assert manifest_doc(store, KEY, newest_name(store, KEY))["format"] == FORMAT_V2


def test_parent_sealed_with_another_key_is_not_used(tmp_path: Path) -> None:
    """After a key rotation chunk ids differ: the old key's page table is not used, nothing is mixed."""
    keys = []
    for name in ("k1", "k2"):
        fd = os.open(tmp_path / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, os.urandom(32))
        os.close(fd)
        keys.append(tmp_path / name)
    url = f"file://{tmp_path}/store"
    a, b = tmp_path / "a", tmp_path / "b"
    pages = make_dump(a)
    write_dump(b, change(pages, 1)[0])
    open_store(url, key_files=[keys[0]]).put(KEY, a, page_images=PATTERNS)
    rotated = open_store(url, key_files=[keys[1], keys[0]])
    info = rotated.put(KEY, b, page_images=PATTERNS)
    assert info.bytes_uploaded > 0.3 * PAGES * PAGE  # stored anew under the new key
    rotated.get(KEY, tmp_path / "restored")
    assert tree_digest(tmp_path / "restored") == tree_digest(b)
    assert rotated.verify() == []


def test_zero_runs_only_aligned_confirmed_zero_pages() -> None:
    data = b"".join(bytes(4096) if z else bytes([i + 1]) * 4096 for i, z in enumerate([1, 0, 1, 1, 0, 1]))
    assert list(_zero_runs(page_hashes(data), memoryview(data), 6)) == [(0, 1), (2, 4), (5, 6)]
    # A zero page's hash straddling two hashes, and one claimed for a page that is not zero: neither counts.
    data = bytes([7]) * 4096 * 3
    forged = b"\x01" * 8 + ZERO_PAGE_HASH + b"\x01" * 8 + ZERO_PAGE_HASH
    assert list(_zero_runs(forged, memoryview(data), 3)) == []
    # Only the first `full` pages: a short last page is never a zero page here.
    data = bytes(4096 * 2 + 100)
    assert list(_zero_runs(page_hashes(data), memoryview(data), 2)) == [(0, 2)]


def _page_refs(store, key: str) -> int:
    doc = manifest_doc(store, key, newest_name(store, key))
    return max(len(e["chunks"]) for e in doc["entries"] if e.get("pages"))


@pytest.mark.parametrize("bounded", [True, False], ids=["bounded", "unbounded-control"])
def test_pages_changed_all_over_keep_the_manifest_small(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bounded: bool
) -> None:
    """A third of the pages changed one by one, all over the image: a reference per unchanged stretch
    would cost more manifest than it saves (a 16 GiB job's went over the manifest limit); the window is
    uploaded as new pages instead, and restores the same. The control lifts the bound to show it acts."""
    if not bounded:
        monkeypatch.setattr(pages_mod, "PAGES_PER_RUN", 1)
        monkeypatch.setattr(pages_mod, "MIN_EXTRA_RUNS", PAGES)
    a, b = tmp_path / "a", tmp_path / "b"
    pages = make_dump(a)
    rng = random.Random(7)
    write_dump(b, [rng.randbytes(PAGE) if i % 3 == 0 else p for i, p in enumerate(pages)])
    store = open_store(f"file://{tmp_path}/store")
    store.put(KEY, a, page_images=PATTERNS)
    first = _page_refs(store, KEY)  # this dump's own fragmentation (a zero page every 4): the baseline
    store.put(KEY, b, page_images=PATTERNS)
    extra = _page_refs(store, KEY) - first
    if bounded:
        assert extra <= PAGES // pages_mod.PAGES_PER_RUN, (extra, first)
    else:
        assert extra > PAGES // 4, (extra, first)  # what the bound prevents: about a reference per changed page
    store.get(KEY, tmp_path / "restored")
    assert tree_digest(tmp_path / "restored") == tree_digest(b)
    assert store.verify() == []


@pytest.mark.timeout(180)
def test_page_images_failing_mid_upload_commit_nothing_and_leave_no_slot_held(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """New pages go to the workers in batches holding a slot per chunk: when the store goes away
    mid-put, the batches after the failure give their slots back (a put that kept them would block
    on the next batch: the timeout fails it), nothing is committed, and the same put succeeds later."""
    srv = request.getfixturevalue("s3_server")
    rng = random.Random(11)
    big = [rng.randbytes(PAGE) for _ in range(6 * PAGES)]  # 96 MiB of new pages: hundreds of batches
    write_dump(tmp_path / "a", big)
    store = open_store(srv.url)
    store.backend.retries, store.backend.backoff = 2, 0.05
    stopped = False

    def stop_midway(done: int, total: int) -> None:
        nonlocal stopped
        if done > total // 8 and not stopped:
            stopped = True
            srv.stop()

    try:
        with pytest.raises(BackendUnavailable):
            store.put(KEY, tmp_path / "a", progress=stop_midway, page_images=PATTERNS)
    finally:
        srv.start()
    assert stopped
    fresh = open_store(srv.url)
    assert fresh.list(KEY) == [], "a failed put must commit nothing"
    fresh.put(KEY, tmp_path / "a", page_images=PATTERNS)
    fresh.get(KEY, tmp_path / "restored")
    assert tree_digest(tmp_path / "restored") == tree_digest(tmp_path / "a")


def test_long_run_of_zero_pages(tmp_path: Path) -> None:
    """More zero pages in a row than one reference may cover (MAX_CHUNK_LEN, 64 MiB; a job's zeroed heap):
    the put used to write a single zero reference the manifest check refused, and failed."""
    src = tmp_path / "src"
    (src / "criu").mkdir(parents=True)
    with open(src / "criu" / "pages-1.img", "wb") as f:
        f.write(b"head" * 1024)
        f.truncate(PAGE + 150 * MIB + PAGE)  # a hole reads as zero pages
        f.seek(PAGE + 150 * MIB)
        f.write(b"tail" * 1024)
    store = open_store(f"file://{tmp_path}/store")
    store.put(KEY, src, page_images=PATTERNS)
    doc = manifest_doc(store, KEY, newest_name(store, KEY))
    (entry,) = [e for e in doc["entries"] if e["path"] == "criu/pages-1.img"]
    zero = [r for r in entry["chunks"] if r[2] == ZERO]
    assert sum(r[1] for r in zero) == 150 * MIB and len(zero) == 3, zero
    store.get(KEY, tmp_path / "restored")
    assert tree_digest(tmp_path / "restored") == tree_digest(src)


@pytest.mark.parametrize(
    ("page_chunker", "described", "mean_low", "mean_high"),
    [(None, "fastcdc:65536 pages=fastcdc:262144", 160 << 10, 512 << 10), ("fixed:65536", None, 64 << 10, 64 << 10)],
    ids=["default", "fixed-64k"],
)
def test_new_pages_are_cut_by_the_page_chunker(
    tmp_path: Path, page_chunker: str | None, described: str | None, mean_low: int, mean_high: int
) -> None:
    """New pages go up in the page chunker's chunks (larger by default: fewer per-chunk costs), whatever the
    files' chunker; the manifest says which cut them."""
    from shim.store import Chunker

    kw = {"page_chunker": Chunker.parse(page_chunker)} if page_chunker else {}
    store = open_store(f"file://{tmp_path}/store", chunker=Chunker.parse("fastcdc:65536"), **kw)
    make_dump(tmp_path / "a")
    store.put(KEY, tmp_path / "a", page_images=PATTERNS)
    doc = manifest_doc(store, KEY, newest_name(store, KEY))
    assert doc["chunker"] == (described or f"fastcdc:65536 pages={page_chunker}")
    refs = next(e["chunks"] for e in doc["entries"] if e["path"] == "criu/pages-1.img")
    lengths = {r[2]: (r[4] if len(r) == 5 else r[1]) for r in refs if r[2] != ZERO}
    full = [n for n in lengths.values()][:-1]  # the stream's last chunk ends where the pages do
    assert mean_low <= sum(full) / len(full) <= mean_high, sorted(lengths.values())
    store.get(KEY, tmp_path / "restored")
    assert tree_digest(tmp_path / "restored") == tree_digest(tmp_path / "a")


def test_cli_page_chunker(tmp_path: Path) -> None:
    import subprocess
    import sys

    url = f"file://{tmp_path}/store"
    make_dump(tmp_path / "a")
    exe = str(Path(sys.executable).parent / "revenant")
    argv = [exe, "store", "put", "--store", url, "--key", KEY, "--page-images", PATTERNS[0]]
    p = subprocess.run([*argv, "--page-chunker", "fixed:131072", str(tmp_path / "a")], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    store = open_store(url)
    assert manifest_doc(store, KEY, newest_name(store, KEY))["chunker"] == "fastcdc:65536 pages=fixed:131072"
    p = subprocess.run([*argv, "--page-chunker", "fixed:1000", str(tmp_path / "a")], capture_output=True, text=True)
    assert p.returncode != 0 and "multiple of 4096" in p.stderr
