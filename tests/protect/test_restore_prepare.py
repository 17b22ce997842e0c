"""The restore's prepare (shim.protect.restorer) from S3 packs (real SeaweedFS): the fetch starts before
containerd has said which image the container runs and the image is checked before the checkpoint is
used; a chunk damaged mid-restore falls back to the older checkpoint; the server stopped mid-fetch is an
outage (Create fails, retried), never a fresh start; every failure leaves the scratch dir empty; the
breakdown of where the time went (shim.protect.restore_breakdown)."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

from harness.store_util import tree_digest
from shim.checkpoint.criu_stats import RestoreStats
from shim.protect.checkpointer import CRIU_DIR
from shim.protect.image_identity import ImageIdentity, ImageLookup
from shim.protect.policy import Protection
from shim.protect.restore_breakdown import PARTS, describe, restore_breakdown
from shim.protect.restorer import NoUsableCheckpoint, RestorePlan, Restorer, RestoreUnavailable
from shim.store import open_store
from shim.store.backends.packs import pack_name

KEY = "team/restore"
IMAGE = ImageIdentity("docker.io/library/job:1", "sha256:" + "a" * 64, "sha256:" + "b" * 64)
MIB = 1 << 20


class SlowLookup(ImageLookup):
    """An ImageLookup whose answer (containerd's, in production) arrives only when released."""

    def __init__(self, value: ImageIdentity | None) -> None:
        self._value = None
        self._where = "test/slow"
        self.release = threading.Event()
        self.asked_before_release = False

        def answer() -> None:
            self.release.wait(10)
            self._value = value

        self._thread = threading.Thread(target=answer, daemon=True)
        self._thread.start()


def _put(url: str, src: Path, seed: int, mib: int = 6) -> int:
    (src / CRIU_DIR).mkdir(parents=True)
    (src / CRIU_DIR / "pages-1.img").write_bytes(os.urandom(mib * MIB))
    (src / CRIU_DIR / "inventory.img").write_bytes(seed.to_bytes(4, "little"))
    with open_store(url) as store:
        return store.put(KEY, src, metadata={"image": IMAGE.as_dict()}).seq


def _protection(url: str) -> Protection:
    return Protection(key=KEY, store=url, interval_s=0, checkpoint_on_stop=False, keep=3)


def _scratch(tmp_path: Path) -> Path:
    scratch = tmp_path / "scratch"
    scratch.mkdir(mode=0o700, exist_ok=True)
    return scratch


def _release_when_fetching(lookup: SlowLookup) -> None:
    """Release the lookup from the first chunk fetch on: proves the fetch did not wait for it."""
    real = open_store

    def opener(url: str):
        store = real(url)
        get_chunk = store.backend.get_chunk

        def first_fetch_releases(digest: str) -> bytes:
            if not lookup.release.is_set():
                lookup.asked_before_release = not lookup.done()  # False: the fetch waited for the answer
                lookup.release.set()
            return get_chunk(digest)

        store.backend.get_chunk = first_fetch_releases
        return store

    return opener


def test_fetch_runs_while_containerd_is_still_asked_and_the_plan_says_where_time_went(
    s3_server,
    tmp_path: Path,
) -> None:
    _put(s3_server.url, tmp_path / "a", 1)
    lookup = SlowLookup(IMAGE)
    plan = Restorer(_release_when_fetching(lookup)).prepare(
        _protection(s3_server.url), _scratch(tmp_path), None, lookup
    )
    assert isinstance(plan, RestorePlan), plan
    assert lookup.asked_before_release, "the fetch waited for containerd's answer"
    assert tree_digest(plan.criu_dir) == tree_digest(tmp_path / "a" / CRIU_DIR)
    t = plan.timings
    assert t.fetch_s > 0 and t.list_s > 0 and t.total_s >= t.fetch_s + t.list_s
    assert t.fetch["bytes_written"] == 6 * MIB + 4 and t.fetch["chunks"] >= 6 * MIB // (
        256 << 10
    )  # FastCDC: at most 256 KiB a chunk
    plan.discard()
    assert list(_scratch(tmp_path).iterdir()) == []


def test_image_that_differs_is_checked_after_the_fetch_and_nothing_is_used(
    s3_server,
    tmp_path: Path,
) -> None:
    seqs = [_put(s3_server.url, tmp_path / f"s{i}", i) for i in range(2)]
    other = ImageIdentity(IMAGE.name, "sha256:" + "c" * 64, IMAGE.base)
    lookup = SlowLookup(other)
    upper = tmp_path / "upper"
    upper.mkdir()
    filled: list[Path] = []
    result = Restorer(_release_when_fetching(lookup)).prepare(
        _protection(s3_server.url), _scratch(tmp_path), upper, lookup, fill=lambda c, u: filled.append(c)
    )
    assert lookup.asked_before_release
    assert isinstance(result, NoUsableCheckpoint), result
    assert sorted(result.unused_seqs) == seqs and all("image differs" in r for r in result.reasons), result
    assert filled == [], "a checkpoint of another image reached the writable layer"
    assert list(_scratch(tmp_path).iterdir()) == []


def test_containerd_not_answering_after_the_fetch_is_an_outage(s3_server, tmp_path: Path) -> None:
    _put(s3_server.url, tmp_path / "a", 1)
    lookup = SlowLookup(None)
    with pytest.raises(RestoreUnavailable, match="which image"):
        Restorer(_release_when_fetching(lookup)).prepare(_protection(s3_server.url), _scratch(tmp_path), None, lookup)
    assert list(_scratch(tmp_path).iterdir()) == []


def test_chunk_damaged_mid_restore_falls_back_to_the_older_checkpoint(s3_server, tmp_path: Path) -> None:
    url = s3_server.url + "&pack_mb=2"
    older = _put(url, tmp_path / "a", 1)
    newer = _put(url, tmp_path / "b", 2)
    with open_store(url) as store:  # flip a byte in the middle of the newer page image, inside its pack
        manifest = store._load(KEY, store._committed(KEY)[newer])
        (pages,) = [e for e in manifest.entries if e["path"].endswith("pages-1.img")]
        digest = pages["chunks"][len(pages["chunks"]) // 2][2]
        store.backend.packs._ensure()
        loc = store.backend.packs._index[digest]
        b = store.backend
        raw = bytearray(b.s3.get_object(Bucket=b.bucket, Key=b.prefix + pack_name(loc.pack))["Body"].read())
        raw[loc.offset + loc.length // 2] ^= 0xFF
        b.put_object(pack_name(loc.pack), raw)
    plan = Restorer().prepare(_protection(url), _scratch(tmp_path), None, IMAGE)
    assert isinstance(plan, RestorePlan) and plan.seq == older, plan
    assert plan.unused_seqs == [newer] and digest in plan.skipped[0], plan.skipped
    assert plan.timings.skipped_s > 0
    assert tree_digest(plan.criu_dir) == tree_digest(tmp_path / "a" / CRIU_DIR)
    assert [p.name for p in _scratch(tmp_path).iterdir()] == [plan.scratch.name], "the damaged fetch was left"
    plan.discard()


def test_server_stopped_mid_fetch_fails_retryably_and_leaves_nothing(s3_server, tmp_path: Path) -> None:
    _put(s3_server.url, tmp_path / "a", 1, mib=64)  # more than the pack reader caches and reads ahead
    stopped = threading.Event()
    real = open_store

    def opener(url: str):
        store = real(url)
        store.backend.retries, store.backend.backoff = 2, 0.05
        get_chunk = store.backend.get_chunk
        fetched = [0]

        def stop_after_some(digest: str) -> bytes:
            fetched[0] += 1
            if fetched[0] == 40 and not stopped.is_set():
                stopped.set()
                s3_server.stop()
            return get_chunk(digest)

        store.backend.get_chunk = stop_after_some
        return store

    with pytest.raises(RestoreUnavailable, match="cannot fetch"):
        Restorer(opener).prepare(_protection(s3_server.url), _scratch(tmp_path), None, IMAGE)
    assert stopped.is_set()
    assert list(_scratch(tmp_path).iterdir()) == [], "an outage left a partial checkpoint in the scratch dir"


def test_breakdown_parts_add_up_and_fit_criu_inside_runc() -> None:
    from shim.protect.restore_breakdown import PrepareTimings

    prepare = PrepareTimings(
        open_s=0.02, claim_s=0.08, list_s=0.05, image_s=0.01, fetch_s=2.0, layer_s=0.2, total_s=2.5
    )
    prepare.fetch = {
        "wall_ms": 2000.0,
        "fetch_ms": 1.0,
        "open_ms": 0.0,
        "decode_ms": 2.0,
        "verify_ms": 3.0,
        "write_ms": 4.0,
        "overlap": 1.0,
        "chunks": 3,
        "zero_chunks": 1,
        "bytes_fetched": 10,
        "bytes_written": 20,
        "files": 2,
    }
    restore = SimpleNamespace(duration_s=1.5, runc_s=1.4, stats=RestoreStats(0, 0, 300_000, 2_000_000, 5))
    b = restore_breakdown(prepare, restore)
    assert b["prepare_other_ms"] == pytest.approx(140.0)
    assert b["criu_forking_ms"] == 300.0 and b["criu_restore_other_ms"] == pytest.approx(1100.0)  # CRIU capped at runc
    assert b["runc_own_ms"] == 0.0 and b["hooks_ms"] == pytest.approx(100.0)
    assert b["total_ms"] == pytest.approx(sum(b[p] for p in PARTS)) and b["total_ms"] == pytest.approx(4000.0)
    assert b["pages_restored"] == 5 and b["fetch"]["chunks"] == 3
    assert "fetch 2000" in describe(b) and "overlap 1.0x" in describe(b)
    nothing = restore_breakdown(None, None)
    assert nothing["total_ms"] == 0.0 and "fetch" not in nothing
