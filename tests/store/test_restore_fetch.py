"""Store.get from S3 packs (real SeaweedFS) with planned read-ahead: byte-identical trees, each pack
window fetched once and ahead of the workers, the timings of every part, and clean failures: a chunk
damaged in the middle of a page image, the server stopped in the middle of the fetch."""

from __future__ import annotations

import re
import threading
from pathlib import Path

import pytest

from harness.cutting_proxy import CuttingProxy
from harness.store_util import make_tree, tree_digest
from shim.store import BackendUnavailable, ChunkCorrupt, open_store
from shim.store.backends.packs import READ_WINDOW, pack_name
from shim.store.get_timing import GetTimings
from shim.store.model import ZERO

KEY = "default/restore/main"


def record_ranges(store) -> list[tuple[str, int, int, str]]:
    """Every ranged GET the store's S3 backend makes: (object, offset, length, thread name)."""
    calls: list[tuple[str, int, int, str]] = []
    backend = store.backend
    real = backend.get_range

    def get_range(name: str, offset: int, length: int) -> bytes:
        calls.append((name, offset, length, threading.current_thread().name))
        return real(name, offset, length)

    backend.get_range = get_range
    return calls


def only_entries(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir())


def test_get_from_packs_fetches_windows_ahead_once_and_is_byte_identical(s3_server, tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src", seed=11, big_mib=48)  # 24 MiB random: 6 packs of ~4 MiB
    open_store(s3_server.url + "&pack_mb=4").put(KEY, src)
    store = open_store(s3_server.url)
    calls = record_ranges(store)
    timings = GetTimings()
    info = store.get(KEY, tmp_path / "out", timings=timings)
    store.close()
    assert tree_digest(tmp_path / "out") == tree_digest(src)

    # Window reads are the ones larger than any chunk (FastCDC: at most 256 KiB).
    windows = [(name, off // READ_WINDOW) for name, off, length, _t in calls if length > 1 << 20]
    assert len(windows) >= 5, calls
    assert len(windows) == len(set(windows)), "a pack window was fetched more than once"
    ahead = [c for c in calls if c[3].startswith("revenant-readahead")]
    assert ahead, "no window was fetched ahead of the workers"
    assert len({name for name, *_ in windows}) >= 2, "the read-ahead should cross from one pack to the next"

    manifest = store._load(KEY, store._committed(KEY)[info.seq])
    refs = [c for e in manifest.entries if e["type"] == "file" for c in e["chunks"]]
    d = timings.as_dict()
    assert d["chunks"] == len(refs) and d["zero_chunks"] == sum(1 for c in refs if c[2] == ZERO)
    assert d["bytes_written"] == sum(c[1] for c in refs if c[2] != ZERO)
    assert d["wall_ms"] > 0 and d["fetch_ms"] > 0 and d["decode_ms"] > 0 and d["verify_ms"] > 0
    assert d["write_ms"] > 0 and d["open_ms"] == 0  # a plaintext store opens nothing
    assert d["files"] == sum(1 for e in manifest.entries if e["type"] == "file")
    assert d["slowest_files"][0]["path"] == "pages-1.img"


def test_files_come_smallest_first(s3_server, tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src", seed=12, big_mib=8)
    open_store(s3_server.url).put(KEY, src)
    timings = GetTimings()
    open_store(s3_server.url).get(KEY, tmp_path / "out", timings=timings)
    order = [f.path for f in timings.files]
    sizes = [f.size for f in timings.files]
    assert sizes == sorted(sizes), order
    assert order[-1] == "sparse.img" and order[-2] == "pages-1.img", order  # 64 MiB apparent, then 8 MiB


def _damage_middle_of_pages(url: str) -> str:
    """Flip a byte of a chunk in the middle of pages-1.img inside its pack; returns the chunk's digest."""
    store = open_store(url)
    manifest = store._load(KEY, store._committed(KEY)[1])
    (pages,) = [e for e in manifest.entries if e["path"] == "pages-1.img"]
    digest = pages["chunks"][len(pages["chunks"]) // 4][2]  # the random half: stored raw, any flip is seen
    packs = store.backend.packs
    packs._ensure()
    loc = packs._index[digest]
    b = store.backend
    raw = bytearray(b.s3.get_object(Bucket=b.bucket, Key=b.prefix + pack_name(loc.pack))["Body"].read())
    raw[loc.offset + loc.length // 2] ^= 0xFF
    b.put_object(pack_name(loc.pack), raw)
    return digest


def test_damaged_chunk_mid_restore_fails_cleanly(s3_server, tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src", seed=13, big_mib=16)
    open_store(s3_server.url + "&pack_mb=2").put(KEY, src)
    digest = _damage_middle_of_pages(s3_server.url)
    parent = tmp_path / "scratch"
    parent.mkdir()
    with pytest.raises(ChunkCorrupt) as err:
        open_store(s3_server.url).get(KEY, parent / "out", fallback=False)
    assert err.value.digest == digest
    assert only_entries(parent) == [], "a failed restore must leave nothing behind"


def test_server_stopped_mid_fetch_is_retryable_and_leaves_nothing(s3_server, tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src", seed=14, big_mib=96)  # 48 MiB random: more than the reader caches
    open_store(s3_server.url).put(KEY, src)
    store = open_store(s3_server.url)
    store.backend.retries, store.backend.backoff = 2, 0.05
    stopped = threading.Event()

    def stop_midway(done: int, total: int) -> None:
        if done > total // 10 and not stopped.is_set():
            stopped.set()
            s3_server.stop()

    parent = tmp_path / "scratch"
    parent.mkdir()
    with pytest.raises(BackendUnavailable):
        store.get(KEY, parent / "out", progress=stop_midway)
    store.close()
    assert stopped.is_set(), "the server was never stopped: the test did not test anything"
    assert only_entries(parent) == []
    s3_server.start()
    open_store(s3_server.url).get(KEY, parent / "out")  # nothing was damaged: it restores now
    assert tree_digest(parent / "out") == tree_digest(src)


@pytest.mark.parametrize(
    "server, what",
    [
        ("s3_server", "pack range"),
        ("s3_server", "manifest"),
        ("gs_server", "pack range"),
        ("oci_registry", "pack range"),
        ("azure_server", "pack range"),
        ("azure_server", "manifest"),
    ],
)
def test_a_response_cut_mid_body_is_retried_not_taken_for_damage(
    server: str, what: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """A GET whose connection ends before the promised bytes (the server stopped, a reset) is a transport
    failure: retried, never taken for damage. A pack range taken for damage failed a restore with
    ChunkCorrupt (seen in CI); a manifest taken for damage made the restore fall back to an older one."""
    first, second = make_tree(tmp_path / "first", seed=16, big_mib=16), make_tree(tmp_path / "second", seed=17)
    real_url = request.getfixturevalue(server).url
    port = int(re.search(r"127\.0\.0\.1:(\d+)", real_url).group(1))  # type: ignore[union-attr]
    # The first response after arming with a body of min_body bytes or more: a listing is ~0.6 KB, the
    # manifest ~7 KB, a pack read window megabytes.
    proxy = CuttingProxy(port, min_body=8192 if what == "pack range" else 2048)
    url = real_url.replace(f"127.0.0.1:{port}", f"127.0.0.1:{proxy.port}")
    try:
        open_store(url).put(KEY, first)
        if what == "manifest":
            open_store(url).put(KEY, second)
        store = open_store(url)
        store.backend.retries, store.backend.backoff = 3, 0.05
        proxy.arm()
        info = store.get(KEY, tmp_path / "out")
        assert proxy.cuts == 1, "no response was cut: the test did not test anything"
        assert info.seq == (2 if what == "manifest" else 1)
        assert tree_digest(tmp_path / "out") == tree_digest(second if what == "manifest" else first)
        assert store.verify() == []
        store.close()
    finally:
        proxy.close()


def test_planned_spans_and_chunks_outside_them(s3_server, tmp_path: Path) -> None:
    """A planned window is fetched only as far as its planned chunks reach; a chunk of the same window
    the plan did not name is still read correctly (on its own)."""
    src = make_tree(tmp_path / "src", seed=15, big_mib=8)
    open_store(s3_server.url).put(KEY, src)
    store = open_store(s3_server.url)
    packs = store.backend.packs
    packs._ensure()
    by_offset = sorted(((loc.pack, loc.offset, loc.length, d) for d, loc in packs._index.items()))
    same_window = [c for c in by_offset if c[0] == by_offset[0][0] and c[1] // READ_WINDOW == 0]
    first, last = same_window[0], same_window[-1]
    assert first != last
    want = {c[3]: store.backend.get_range(pack_name(c[0]), c[1], c[2]) for c in (first, last)}
    calls = record_ranges(store)
    store.backend.plan_reads([last[3]])
    assert store.backend.get_chunk(last[3]) == want[last[3]]
    assert calls[0][1:3] == (last[1], last[2]), "the window was fetched beyond its planned span"
    assert store.backend.get_chunk(first[3]) == want[first[3]]
    assert calls[1][1:3] == (first[1], first[2])
    assert store.backend.get_chunk(last[3]) == want[last[3]]
    assert len(calls) == 2, "a planned chunk already fetched was fetched again"
    store.close()
