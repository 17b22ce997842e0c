"""Only "no usable checkpoint" may start a job fresh: an unreachable store or a node without room for
the checkpoint is an outage (RestoreUnavailable, Create fails and is retried), and retention never
prunes the checkpoints a container could not use. Real file:// stores, a real refused S3 endpoint and
on-disk scratch (tests/protect/test_local_resources.py mounts a small tmpfs, as root)."""

from __future__ import annotations

import errno
import os
import socket
from pathlib import Path

import pytest

from shim.protect.checkpointer import CRIU_DIR, prune_superseded
from shim.protect.policy import Protection
from shim.protect.restorer import NoUsableCheckpoint, RestorePlan, Restorer, RestoreUnavailable
from shim.store import Fenced, open_store


def _put(store_url: str, key: str, src: Path, size: int = 4096, metadata: dict | None = None) -> int:
    (src / CRIU_DIR).mkdir(parents=True)
    (src / CRIU_DIR / "pages-1.img").write_bytes(os.urandom(size))
    with open_store(store_url) as store:
        return store.put(key, src, metadata=metadata or {}).seq


def _protection(url: str, key: str = "team/job") -> Protection:
    return Protection(key=key, store=url, interval_s=0, checkpoint_on_stop=False, keep=3)


def _scratch(tmp_path: Path) -> Path:
    scratch = tmp_path / "scratch"
    scratch.mkdir(mode=0o700, exist_ok=True)
    return scratch


def test_an_unreachable_store_is_an_outage_not_a_fresh_start(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nothing listens on: connection refused, as with S3 down
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"s3://revenant-test/x?endpoint=http://127.0.0.1:{port}"
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "test")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "test")
    with pytest.raises(RestoreUnavailable, match="cannot list the checkpoints of team/job"):
        Restorer().prepare(_protection(url), _scratch(tmp_path), None, None)


def test_an_unsafe_scratch_dir_is_an_outage(tmp_path: Path) -> None:
    url = f"file://{tmp_path / 'store'}"
    _put(url, "team/job", tmp_path / "src")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    scratch.chmod(0o777)
    with pytest.raises(RestoreUnavailable, match="not 0700"):
        Restorer().prepare(_protection(url), scratch, None, None)


def test_damage_is_still_skipped_and_reported(tmp_path: Path) -> None:
    url = f"file://{tmp_path / 'store'}?packs=0"
    good = _put(url, "team/job", tmp_path / "a")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "not-criu").write_text("x")
    with open_store(url) as store:
        bad = store.put("team/job", tmp_path / "b", metadata={}).seq
    plan = Restorer().prepare(_protection(url), _scratch(tmp_path), None, None)
    assert isinstance(plan, RestorePlan) and plan.seq == good and plan.unused_seqs == [bad], plan
    assert plan.scratch.parent == _scratch(tmp_path) and plan.scratch.name.startswith(f"{os.getpid()}-restore-")
    plan.discard()
    fresh = Restorer().prepare(_protection(url), _scratch(tmp_path), None, None, skip_seqs=[good])
    assert isinstance(fresh, NoUsableCheckpoint) and fresh.unused_seqs == [bad]


def test_retention_keeps_checkpoints_the_container_could_not_use(tmp_path: Path) -> None:
    url = f"file://{tmp_path / 'store'}"
    old = [_put(url, "team/job", tmp_path / f"old{i}") for i in range(2)]  # e.g. another image's
    new = [_put(url, "team/job", tmp_path / f"new{i}") for i in range(4)]  # the fresh job's
    with open_store(url) as store:
        pruned = prune_superseded(store, "team/job", 2, frozenset(old))
        left = sorted(i.seq for i in store.list("team/job"))
    assert pruned == sorted(new[:2], reverse=True)
    assert left == sorted(old + new[2:])


def test_a_store_that_cannot_be_opened_is_an_outage(tmp_path: Path) -> None:
    # The store refuses to open (here a URL the backend rejects; with encryption, an unreadable key file).
    with pytest.raises(RestoreUnavailable, match="cannot open the store of team/job"):
        Restorer().prepare(_protection("file://not-absolute/x"), _scratch(tmp_path), None, None)


def test_an_image_containerd_cannot_name_is_an_outage_once_there_is_something_to_restore(tmp_path: Path) -> None:
    from shim.protect.image_identity import ImageLookup

    url = f"file://{tmp_path / 'store'}"
    nowhere = f"unix://{tmp_path / 'no-containerd.sock'}"
    # Nothing to restore: the unknown image does not matter.
    fresh = Restorer().prepare(_protection(url), _scratch(tmp_path), None, ImageLookup(nowhere, "ns", "c1"))
    assert isinstance(fresh, NoUsableCheckpoint) and not fresh.reasons
    _put(url, "team/job", tmp_path / "a")
    with pytest.raises(RestoreUnavailable, match="cannot ask containerd which image"):
        Restorer().prepare(_protection(url), _scratch(tmp_path), None, ImageLookup(nowhere, "ns", "c1"))


@pytest.mark.parametrize(
    ("errno_", "damage"),
    [(errno.ELOOP, True), (errno.EEXIST, True), (errno.ENOSPC, False), (errno.EIO, False), (errno.EDQUOT, False)],
)
def test_a_local_error_the_store_wraps_is_judged_by_its_cause(errno_: int, damage: bool) -> None:
    from shim.protect.restorer import _is_damage
    from shim.store import StoreError

    try:
        try:
            raise OSError(errno_, os.strerror(errno_))
        except OSError as e:
            raise StoreError(f"restore of 'team/job' seq 1 failed: {e}") from e
    except StoreError as wrapped:
        assert _is_damage(wrapped) is damage


def test_a_restore_claims_the_key_before_it_picks_a_checkpoint(tmp_path: Path) -> None:
    """The old owner (cut off by a partition) commits right up to the claim: the restore must pick that
    newest checkpoint, and every later put of the old owner is fenced, so history never forks."""
    url = f"file://{tmp_path / 'store'}"
    with open_store(url) as store:
        old_epoch = store.claim("team/job", owner="node-a")

    def _put_as(name: str) -> int:
        return _put_with_epoch(url, tmp_path / name, old_epoch)

    first = _put_as("a1")

    def claim(store) -> None:
        nonlocal last_of_a
        last_of_a = _put_as("a2")  # lands just before the new owner's claim
        store.claim("team/job", owner="node-b")

    last_of_a = 0
    plan = Restorer().prepare(_protection(url), _scratch(tmp_path), None, None, claim=claim)
    assert isinstance(plan, RestorePlan) and plan.seq == last_of_a > first, (plan, first, last_of_a)
    plan.discard()
    with pytest.raises(Fenced):
        _put_as("a3")


def _put_with_epoch(store_url: str, src: Path, epoch: int) -> int:
    (src / CRIU_DIR).mkdir(parents=True)
    (src / CRIU_DIR / "pages-1.img").write_bytes(os.urandom(4096))
    with open_store(store_url) as store:
        return store.put("team/job", src, metadata={}, epoch=epoch).seq
