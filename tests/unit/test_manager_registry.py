"""A container deleted while its checkpoint runs must not come back in the node registry when that
checkpoint finishes (the agent would keep draining a container that no longer exists)."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from shim.checkpoint.engine import CheckpointResult
from shim.protect import registry
from shim.protect.checkpointer import ProtectedContainer
from shim.protect.manager import Protected, ProtectionManager
from shim.protect.policy import NodeConfig, Protection


class DeletedDuringDump:
    """Stands in for CRIU (this test is about the shim's bookkeeping): writes an image, and Delete
    arrives while the dump is in flight."""

    hooks = None

    def __init__(self) -> None:
        self.manager: ProtectionManager | None = None

    def checkpoint(self, runc: Any, cid: str, image_dir: Path, options: Any, keep_log_in: Any = None, wrap: Any = None):
        image_dir.mkdir(parents=True, exist_ok=True)
        (image_dir / "inventory.img").write_bytes(b"image")
        assert self.manager is not None
        self.manager.deleted(SimpleNamespace(id=cid))  # the hook takes the container; only its id matters here
        return CheckpointResult(image_dir, 0.01, None, 5)

    def forget(self, cid: str) -> None:
        pass


def test_a_checkpoint_finishing_after_delete_does_not_recreate_the_record(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv(registry.RUN_DIR_ENV, raising=False)
    node = NodeConfig(run_dir=tmp_path / "run", staging_dir=tmp_path / "shm", scratch_dir=tmp_path / "scratch")
    engine = DeletedDuringDump()
    manager = ProtectionManager("ns", "unix:///shim.sock", node=node, engine=engine)  # type: ignore[arg-type]
    engine.manager = manager
    protection = Protection(
        key="team/job", store=f"file://{tmp_path / 'store'}", interval_s=0, checkpoint_on_stop=False, keep=3
    )
    pc = ProtectedContainer("ns", "c1", tmp_path, protection, runc=None, init_pid=os.getpid())  # type: ignore[arg-type]
    p = Protected(pc)
    manager._protected["c1"] = p
    manager._write_record(p)
    path = registry.task_path(node.run_dir, "ns", "c1")
    assert path.exists()

    report = manager.checkpoint("c1", exit=False, reason="periodic")
    assert report.seq == 1  # the checkpoint itself is committed
    assert not path.exists(), "the deleted container's registry record came back"
