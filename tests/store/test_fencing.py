"""Owner epochs on real file, S3 (SeaweedFS) and Azure (Azurite) stores: after a new owner claims a key, the old
owner's puts are refused, also a put already running; restores read everything. `gs` is the same SeaweedFS through
the gs:// backend: SeaweedFS ignores GCS's x-goog-if-generation-match, so there the backend's probe finds no
conditional create and the one-name-per-claim scheme is what runs (the GCS header itself is exercised in
test_gcs.py against a loopback recorder that applies it)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from harness.store_util import make_tree, tree_digest
from shim.store import Fenced, StoreError, open_store

KEY = "default/mypod/main"


@pytest.fixture(params=["file", "s3", "s3-no-conditional", "az", "az-no-conditional", "gs"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "file":
        return f"file://{tmp_path}/store"
    fixture = {"gs": "gs_server"}.get(request.param, "azure_server" if request.param.startswith("az") else "s3_server")
    return request.getfixturevalue(fixture).url


def opened(url: str, request: pytest.FixtureRequest, **kw):
    store = open_store(url, **kw)
    if request.node.callspec.params["url"].endswith("-no-conditional"):
        # A server without If-None-Match: one object name per claim, the contested epoch is skipped.
        store.backend._conditional = False
    elif request.node.callspec.params["url"] == "gs":
        assert not store.backend.conditional_writes(), "SeaweedFS now honours x-goog-if-generation-match: update"
    else:
        assert store.backend.__class__.__name__ == "LocalBackend" or store.backend.conditional_writes()
    return store


def test_older_owner_fenced_after_newer_claims(url: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    old_node, new_node = opened(url, request), opened(url, request)
    trees = [make_tree(tmp_path / f"t{i}", seed=10 + i, big_mib=1) for i in range(4)]
    assert old_node.epoch(KEY) == 0
    e1 = old_node.claim(KEY, "node-a")
    assert e1 == 1 and old_node.epoch(KEY) == 1
    assert old_node.put(KEY, trees[0], epoch=e1).seq == 1
    e2 = new_node.claim(KEY, "node-b")
    assert e2 == 2
    with pytest.raises(Fenced, match=r"epoch 1 is fenced.*current epoch is 2") as err:
        old_node.put(KEY, trees[1], epoch=e1)
    assert err.value.epoch == 1 and err.value.current == 2
    assert new_node.put(KEY, trees[2], epoch=e2).seq == 2
    with pytest.raises(StoreError, match="never claimed"):
        new_node.put(KEY, trees[2], epoch=7)
    assert new_node.put(KEY, trees[3]).seq == 3  # puts without an epoch (CLI, old callers) still work
    assert opened(url, request).claim("other/key", "node-a") == 1  # epochs are per key
    # Restores read every committed checkpoint, whoever wrote it.
    reader = open_store(url)
    for seq, tree in ((1, trees[0]), (2, trees[2]), (3, trees[3])):
        reader.get(KEY, tmp_path / f"r{seq}", seq=seq)
        assert tree_digest(tmp_path / f"r{seq}") == tree_digest(tree)
    assert reader.verify() == []


@pytest.mark.parametrize("point", ["store.put.before_commit", "store.put.before-manifest"])
def test_claim_during_put_fails_it_before_commit(
    url: str, request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, point: str
) -> None:
    old_node = opened(url, request)
    v1, v2 = make_tree(tmp_path / "v1", seed=20, big_mib=1), make_tree(tmp_path / "v2", seed=21, big_mib=2)
    epoch = old_node.claim(KEY, "node-a")
    old_node.put(KEY, v1, epoch=epoch)
    # The claim must land while the put waits at the point: the claimer's client exists before the put
    # starts, and the wait is long enough for a loaded machine (packs made the put reach it sooner).
    claimer = opened(url, request)
    monkeypatch.setenv("REVENANT_FAULT_DELAY", f"{point}=4")
    errors: list = []

    def slow_put() -> None:
        try:
            opened(url, request).put(KEY, v2, epoch=epoch)
        except Exception as e:
            errors.append(e)

    t = threading.Thread(target=slow_put)
    t.start()
    time.sleep(1)
    assert claimer.claim(KEY, "node-b") == epoch + 1
    t.join()
    assert len(errors) == 1 and isinstance(errors[0], Fenced), errors
    reader = open_store(url)
    assert [i.seq for i in reader.list(KEY)] == [1], "a fenced put left a checkpoint"
    reader.get(KEY, tmp_path / "r")
    assert tree_digest(tmp_path / "r") == tree_digest(v1)


def test_concurrent_claims_get_distinct_epochs(url: str, request: pytest.FixtureRequest) -> None:
    got: list[int] = []
    errors: list = []

    def claim(i: int) -> None:
        try:
            got.append(opened(url, request).claim(KEY, f"node-{i}"))
        except Exception as e:
            errors.append(e)

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(set(got)) == 6, got
    assert open_store(url).epoch(KEY) == max(got)
