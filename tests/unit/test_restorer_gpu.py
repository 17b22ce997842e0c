"""The restorer skips a checkpoint the node cannot take (its GPUs differ) and names why, with a real
file:// store; a CPU-only checkpoint is never refused."""

from __future__ import annotations

from pathlib import Path

from shim.protect.checkpointer import CRIU_DIR
from shim.protect.policy import Protection
from shim.protect.restorer import NoUsableCheckpoint, RestorePlan, Restorer
from shim.store import open_store


def _put(store_url: str, key: str, tmp: Path, name: str, gpu: dict | None) -> int:
    src = tmp / name
    (src / CRIU_DIR).mkdir(parents=True)
    (src / CRIU_DIR / "inventory.img").write_bytes(b"images of " + name.encode())
    with open_store(store_url) as store:
        return store.put(key, src, metadata={"gpu": gpu}).seq


def test_gpu_incompatible_checkpoint_is_skipped_for_an_older_one(tmp_path: Path):
    url, key = f"file://{tmp_path / 'store'}", "team/job"
    cpu_seq = _put(url, key, tmp_path, "cpu", None)
    _put(url, key, tmp_path, "gpu", {"cuda_processes": 1, "node": {"models": ["H100"], "count": 1}})
    protection = Protection(key=key, store=url, interval_s=0, checkpoint_on_stop=False, keep=3)

    def refuse_gpu(meta: dict) -> str | None:
        return "this node has no H100" if meta.get("gpu") else None

    scratch = tmp_path / "scratch"
    scratch.mkdir(mode=0o700)
    plan = Restorer().prepare(protection, scratch, None, None, compatible=refuse_gpu)
    assert isinstance(plan, RestorePlan) and plan.seq == cpu_seq
    assert any("no H100" in r for r in plan.skipped), plan.skipped
    plan.discard()

    none_left = Restorer().prepare(protection, scratch, None, None, skip_seqs=[cpu_seq], compatible=refuse_gpu)
    assert isinstance(none_left, NoUsableCheckpoint) and "no H100" in str(none_left)
