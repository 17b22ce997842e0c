"""The gRPC face of the snapshotter: containerd.services.snapshots.v1.Snapshots on a unix socket."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any, TypeVar

import grpc
from google.protobuf import empty_pb2, timestamp_pb2

from revenant_pb.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from revenant_pb.containerd.services.snapshots.v1 import snapshots_pb2_grpc as pb_grpc
from revenant_pb.containerd.types import mount_pb2
from shim import errors
from snapshotter import metadata as md
from snapshotter.overlay import Mount, OverlaySnapshotter

log = logging.getLogger(__name__)

NAMESPACE_HEADER = "containerd-namespace"
# Entries per List response message; containerd's own service batches the same way.
LIST_BATCH = 100

# revenant's domain kinds -> gRPC codes (errdefs.FromGRPC reads them back as the same kinds).
_CODES: dict[type[errors.RevenantError], grpc.StatusCode] = {
    errors.Cancelled: grpc.StatusCode.CANCELLED,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    errors.Unimplemented: grpc.StatusCode.UNIMPLEMENTED,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.Aborted: grpc.StatusCode.ABORTED,
    errors.OutOfRange: grpc.StatusCode.OUT_OF_RANGE,
    errors.DataLoss: grpc.StatusCode.DATA_LOSS,
    errors.Internal: grpc.StatusCode.INTERNAL,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
}

F = TypeVar("F", bound=Callable[..., Any])


def _grpc_errors(fn: F) -> F:
    """The service's edge: map domain errors onto the gRPC codes containerd's errdefs.FromGRPC understands."""

    @functools.wraps(fn)
    def wrapper(self: SnapshotsService, request: Any, context: grpc.ServicerContext) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(self, request, context)
        except errors.RevenantError as e:
            code = next((c for t, c in _CODES.items() if isinstance(e, t)), grpc.StatusCode.UNKNOWN)
            message = str(e)
            log.info("%s: %s (%s)", fn.__name__, e, code.name)
        except Exception as e:
            code, message = grpc.StatusCode.INTERNAL, f"{fn.__name__}: {e}"
            log.exception("%s failed", fn.__name__)
        finally:
            log.debug("%s %s: %.1f ms", fn.__name__, getattr(request, "key", ""), (time.perf_counter() - t0) * 1000)
        context.abort(code, message)  # raises; outside the try so it is never caught above

    return wrapper  # type: ignore[return-value]


def _namespace(context: grpc.ServicerContext) -> str:
    for k, v in context.invocation_metadata() or ():
        if k == NAMESPACE_HEADER:
            return v
    return ""


def _mounts_pb(mounts: list[Mount]) -> list[mount_pb2.Mount]:
    return [mount_pb2.Mount(type=m.type, source=m.source, target=m.target, options=list(m.options)) for m in mounts]


def _ts(ns: int) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=ns // 1_000_000_000, nanos=ns % 1_000_000_000)


def _info(s: md.Snapshot) -> pb.Info:
    return pb.Info(
        name=s.key,
        parent=s.parent,
        kind=int(s.kind),
        created_at=_ts(s.created_ns),
        updated_at=_ts(s.updated_ns),
        labels=s.labels,
    )


class SnapshotsService(pb_grpc.SnapshotsServicer):
    def __init__(self, snap: OverlaySnapshotter) -> None:
        self.snap = snap

    @_grpc_errors
    def Prepare(self, request: pb.PrepareSnapshotRequest, context: grpc.ServicerContext) -> pb.PrepareSnapshotResponse:
        mounts = self.snap.prepare(_namespace(context), request.key, request.parent, dict(request.labels))
        return pb.PrepareSnapshotResponse(mounts=_mounts_pb(mounts))

    @_grpc_errors
    def View(self, request: pb.ViewSnapshotRequest, context: grpc.ServicerContext) -> pb.ViewSnapshotResponse:
        mounts = self.snap.prepare(
            _namespace(context), request.key, request.parent, dict(request.labels), kind=md.Kind.VIEW
        )
        return pb.ViewSnapshotResponse(mounts=_mounts_pb(mounts))

    @_grpc_errors
    def Mounts(self, request: pb.MountsRequest, context: grpc.ServicerContext) -> pb.MountsResponse:
        return pb.MountsResponse(mounts=_mounts_pb(self.snap.mounts(_namespace(context), request.key)))

    @_grpc_errors
    def Commit(self, request: pb.CommitSnapshotRequest, context: grpc.ServicerContext) -> empty_pb2.Empty:
        self.snap.commit(_namespace(context), request.name, request.key, dict(request.labels))
        return empty_pb2.Empty()

    @_grpc_errors
    def Remove(self, request: pb.RemoveSnapshotRequest, context: grpc.ServicerContext) -> empty_pb2.Empty:
        self.snap.remove(_namespace(context), request.key)
        return empty_pb2.Empty()

    @_grpc_errors
    def Stat(self, request: pb.StatSnapshotRequest, context: grpc.ServicerContext) -> pb.StatSnapshotResponse:
        return pb.StatSnapshotResponse(info=_info(self.snap.stat(_namespace(context), request.key)))

    @_grpc_errors
    def Update(self, request: pb.UpdateSnapshotRequest, context: grpc.ServicerContext) -> pb.UpdateSnapshotResponse:
        paths = list(request.update_mask.paths) if request.HasField("update_mask") else []
        snap = self.snap.update(_namespace(context), request.info.name, dict(request.info.labels), paths)
        return pb.UpdateSnapshotResponse(info=_info(snap))

    @_grpc_errors
    def List(
        self, request: pb.ListSnapshotsRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.ListSnapshotsResponse]:
        # Resolve (and validate filters) before streaming, so errors carry their proper code.
        snaps = self.snap.list(_namespace(context), list(request.filters))
        return self._stream(snaps)

    @staticmethod
    def _stream(snaps: list[md.Snapshot]) -> Iterator[pb.ListSnapshotsResponse]:
        for i in range(0, len(snaps), LIST_BATCH):
            yield pb.ListSnapshotsResponse(info=[_info(s) for s in snaps[i : i + LIST_BATCH]])

    @_grpc_errors
    def Usage(self, request: pb.UsageRequest, context: grpc.ServicerContext) -> pb.UsageResponse:
        u = self.snap.usage(_namespace(context), request.key)
        return pb.UsageResponse(size=u.size, inodes=u.inodes)

    @_grpc_errors
    def Cleanup(self, request: pb.CleanupRequest, context: grpc.ServicerContext) -> empty_pb2.Empty:
        self.snap.cleanup()
        return empty_pb2.Empty()


def serve(snap: OverlaySnapshotter, address: str, max_workers: int = 16) -> grpc.Server:
    """Start serving on unix socket `address` (mode 0600, parent dir created 0700 if missing)."""
    sock = Path(address)
    if not sock.parent.exists():
        sock.parent.mkdir(parents=True, mode=0o700)
    with contextlib.suppress(FileNotFoundError):
        sock.unlink()  # a stale socket from a killed predecessor
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="snapshots"))
    pb_grpc.add_SnapshotsServicer_to_server(SnapshotsService(snap), server)
    old_umask = os.umask(0o177)  # the socket is born 0600: no window where others can connect
    try:
        server.add_insecure_port(f"unix:{sock}")
        server.start()
    finally:
        os.umask(old_umask)
    os.chmod(sock, 0o600)
    log.info("serving containerd.services.snapshots.v1.Snapshots on %s", sock)
    return server
