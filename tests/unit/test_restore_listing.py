"""A restore loads the key's manifests newest first and only as far as it needs (Store.newest_first,
shim.store.replication.Copies.newest_first): a usable newest checkpoint costs one manifest, not one per
kept checkpoint; a store that stops answering before an older manifest loads is still an outage, never
a fresh start. Real file:// stores."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from shim.protect.checkpointer import CRIU_DIR
from shim.protect.policy import Protection
from shim.protect.restorer import RestorePlan, Restorer, RestoreUnavailable
from shim.store import BackendUnavailable, open_store
from shim.store.model import parse_manifest_name

KEY = "team/listing"


def _put_three(url: str, tmp_path: Path) -> list[int]:
    seqs = []
    for i in range(3):
        src = tmp_path / f"src{i}"
        (src / CRIU_DIR).mkdir(parents=True)
        (src / CRIU_DIR / "pages-1.img").write_bytes(os.urandom(4096))
        with open_store(url) as store:
            seqs.append(store.put(KEY, src, metadata={}).seq)
    return seqs


def _counting(loaded: list[int], fail_after: int | None = None):  # -> an open_store for Restorer
    def opener(url: str) -> Any:
        store = open_store(url)
        real = store._load

        def load(key: str, name: str, *a: Any, **kw: Any) -> Any:
            if fail_after is not None and len(loaded) >= fail_after:
                raise BackendUnavailable(f"{url}: stopped answering")
            parsed = parse_manifest_name(name)
            assert parsed is not None
            loaded.append(parsed[0])
            return real(key, name, *a, **kw)

        store._load = load
        return store

    return opener


def _scratch(tmp_path: Path) -> Path:
    scratch = tmp_path / "scratch"
    scratch.mkdir(mode=0o700, exist_ok=True)
    return scratch


def _protection(url: str) -> Protection:
    return Protection(key=KEY, store=url, interval_s=0, checkpoint_on_stop=False, keep=3)


def test_a_usable_newest_checkpoint_loads_only_its_own_manifest(tmp_path: Path) -> None:
    url = f"file://{tmp_path / 'store'}"
    seqs = _put_three(url, tmp_path)
    loaded: list[int] = []
    plan = Restorer(_counting(loaded)).prepare(_protection(url), _scratch(tmp_path), None, None)
    assert isinstance(plan, RestorePlan) and plan.seq == seqs[-1]
    assert set(loaded) == {seqs[-1]}, f"older manifests loaded for nothing: {loaded}"
    plan.discard()


def test_an_unusable_newest_loads_the_next_one_only_then(tmp_path: Path) -> None:
    url = f"file://{tmp_path / 'store'}"
    seqs = _put_three(url, tmp_path)
    loaded: list[int] = []
    plan = Restorer(_counting(loaded)).prepare(_protection(url), _scratch(tmp_path), None, None, skip_seqs=[seqs[-1]])
    assert isinstance(plan, RestorePlan) and plan.seq == seqs[-2]
    assert loaded[:2] == [seqs[-1], seqs[-2]] and seqs[0] not in loaded
    plan.discard()
    loaded.clear()
    compatible = lambda meta: None if loaded.count(seqs[0]) else "taken on another GPU"  # noqa: E731
    fresh_or_plan = Restorer(_counting(loaded)).prepare(
        _protection(url), _scratch(tmp_path), None, None, compatible=compatible
    )
    assert isinstance(fresh_or_plan, RestorePlan) and fresh_or_plan.seq == seqs[0]
    assert loaded[:3] == [seqs[2], seqs[1], seqs[0]], "newest first, each only once the newer was refused"
    assert sorted(fresh_or_plan.unused_seqs) == seqs[1:]
    fresh_or_plan.discard()


def test_the_store_stopping_before_an_older_manifest_is_an_outage(tmp_path: Path) -> None:
    url = f"file://{tmp_path / 'store'}"
    seqs = _put_three(url, tmp_path)
    loaded: list[int] = []
    with pytest.raises(RestoreUnavailable, match=f"cannot list the checkpoints of {KEY}"):
        Restorer(_counting(loaded, fail_after=1)).prepare(
            _protection(url), _scratch(tmp_path), None, None, skip_seqs=[seqs[-1]]
        )
    assert loaded == [seqs[-1]], "the newest loaded (and skipped), the next one's load failed"
    assert list((tmp_path / "scratch").iterdir()) == []
