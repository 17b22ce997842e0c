"""revenant.v1.Control on the shim's socket: checkpoint a protected container now, its registry
record, the statistics of its last checkpoint. The agent's drain and the `revenant` CLI call it."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Protocol

from revenant_pb.revenant.v1 import control_pb2 as ctl
from shim.errors import NotFound
from shim.ttrpc import Context, Service

if TYPE_CHECKING:  # not imported at run time: the shim builds its manager on first use (shim.daemon.deferred)
    from shim.protect.checkpointer import CheckpointReport
    from shim.protect.manager import Protected
    from shim.protect.registry import TaskRecord

CONTROL_API = ctl.DESCRIPTOR.services_by_name["Control"]


class Protection(Protocol):
    """What Control needs of transparent protection (shim.protect.manager.ProtectionManager has it)."""

    def get(self, cid: str) -> Protected | None: ...

    def record(self, p: Protected) -> TaskRecord: ...

    def last_stats(self, cid: str) -> dict[str, Any] | None: ...

    def checkpoint(self, cid: str, *, exit: bool, reason: str, timeout_s: float | None = None) -> CheckpointReport: ...


class ControlService:
    def __init__(self, protection: Protection) -> None:
        self.protection = protection

    def service(self) -> Service:
        return Service.from_descriptor(CONTROL_API, self)

    def Checkpoint(self, ctx: Context, req: ctl.CheckpointRequest) -> ctl.CheckpointResponse:
        timeout = req.timeout_ms / 1000 if req.timeout_ms else ctx.time_left()
        r = self.protection.checkpoint(req.id, exit=req.exit, reason=req.reason or "requested", timeout_s=timeout)
        return ctl.CheckpointResponse(
            key=r.key,
            seq=r.seq,
            bytes_read=r.bytes_read,
            bytes_uploaded=r.bytes_uploaded,
            freeze_s=r.freeze_s,
            total_s=r.total_s,
            stats_json=json.dumps(r.stats),
        )

    def Status(self, ctx: Context, req: ctl.StatusRequest) -> ctl.StatusResponse:
        p = self.protection.get(req.id)
        if p is None:
            raise NotFound(f"container {req.id} is not protected by revenant")
        return ctl.StatusResponse(record_json=self.protection.record(p).to_json())

    def Stats(self, ctx: Context, req: ctl.StatsRequest) -> ctl.StatsResponse:
        # Every checkpoint of this shim goes through the engine, ctr's and protection's alike.
        stats = self.protection.last_stats(req.id)
        if stats is None:
            raise NotFound(f"container {req.id} has no checkpoint in this shim")
        p = self.protection.get(req.id)
        if p is not None and p.last_report is not None:
            stats["revenant"] = p.last_report.as_dict()  # the store side of a protective checkpoint
        return ctl.StatsResponse(stats_json=json.dumps(stats))
