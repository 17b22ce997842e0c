"""A restore claims the key's owner epoch once, before listing (shim.protect.restorer); Start's
background claim then opens no second store (a second S3 client costs 0.15-0.35 s of the shim's CPU
while CRIU restores). A container that started without that claim still claims at Start."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import shim.store
from shim.protect.checkpointer import ProtectedContainer, claim_key
from shim.protect.manager import ProtectionManager
from shim.protect.policy import Protection


def _container(url: str) -> ProtectedContainer:
    protection = Protection(key="team/claim", store=url, interval_s=0, checkpoint_on_stop=False, keep=3)
    return ProtectedContainer(namespace="ns", id="job", bundle=Path("/nonexistent"), protection=protection, runc=None)  # type: ignore[arg-type]


@pytest.fixture
def opened(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The URLs shim.store.open_store was asked to open (it still opens them)."""
    seen: list[str] = []
    real = shim.store.open_store

    def open_store(url: str, *a: Any, **kw: Any) -> Any:
        seen.append(url)
        return real(url, *a, **kw)

    monkeypatch.setattr(shim.store, "open_store", open_store)
    return seen


def test_start_after_the_restores_claim_opens_no_second_store(tmp_path: Path, opened: list[str]) -> None:
    url = f"file://{tmp_path / 'store'}"
    pc = _container(url)
    with shim.store.open_store(url) as store:  # what the restore's prepare does before listing
        assert claim_key(pc, store) == 1
    opened.clear()
    ProtectionManager._claim_key(pc)
    assert opened == []
    with shim.store.open_store(url) as store:
        assert store.epoch("team/claim") == 1, "Start claimed again: the restore's own epoch was superseded"


def test_start_without_a_claim_still_claims(tmp_path: Path, opened: list[str]) -> None:
    url = f"file://{tmp_path / 'store'}"
    pc = _container(url)
    ProtectionManager._claim_key(pc)
    assert opened == [url] and pc.epoch == 1
    with shim.store.open_store(url) as store:
        assert store.epoch("team/claim") == 1
