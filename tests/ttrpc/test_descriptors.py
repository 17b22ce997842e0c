"""Services and typed clients built from proto descriptors, and domain errors crossing the server's
edge as their status codes (on a real Server over a unix socket)."""

from __future__ import annotations

import pytest

from revenant_pb.revenant.v1 import control_pb2 as ctl
from shim import errors
from shim.store import BackendUnavailable, CheckpointNotFound, ChunkCorrupt
from shim.ttrpc import NAMESPACE_KEY, Client, Code, Context, Service, ServiceClient, TtrpcError
from shim.ttrpc import NotFound as WireNotFound

CONTROL = ctl.DESCRIPTOR.services_by_name["Control"]

RAISES = {
    "not-found": (errors.NotFound("no container c1"), Code.NOT_FOUND),
    "exists": (errors.AlreadyExists("c1 exists"), Code.ALREADY_EXISTS),
    "precondition": (errors.FailedPrecondition("c1 has not started"), Code.FAILED_PRECONDITION),
    "invalid": (errors.InvalidArgument("bad annotation"), Code.INVALID_ARGUMENT),
    "unavailable": (errors.Unavailable("store down"), Code.UNAVAILABLE),
    "deadline": (errors.DeadlineExceeded("too late"), Code.DEADLINE_EXCEEDED),
    "unimplemented": (errors.Unimplemented("no engine"), Code.UNIMPLEMENTED),
    "data-loss": (errors.DataLoss("torn manifest"), Code.DATA_LOSS),
    "plain": (errors.RevenantError("runc said no"), Code.UNKNOWN),
    "store-missing": (CheckpointNotFound("no checkpoint team/job"), Code.NOT_FOUND),
    "store-corrupt": (ChunkCorrupt("ab12", "does not match its digest"), Code.DATA_LOSS),
    "store-down": (BackendUnavailable("s3 unreachable after retries"), Code.UNAVAILABLE),
    "wire-code": (TtrpcError("aborted by code", Code.ABORTED), Code.ABORTED),
}


class Control:
    def __init__(self) -> None:
        self.namespaces: list[str] = []

    def Checkpoint(self, ctx: Context, req: ctl.CheckpointRequest) -> ctl.CheckpointResponse:
        self.namespaces.append(ctx.namespace)
        return ctl.CheckpointResponse(key=f"key-of-{req.id}", seq=7)

    def Status(self, ctx: Context, req: ctl.StatusRequest) -> ctl.StatusResponse:
        raise RAISES[req.id][0]

    def Stats(self, ctx: Context, req: ctl.StatsRequest) -> ctl.StatsResponse:
        return ctl.StatsResponse(stats_json="{}")


class NoStats:
    def Checkpoint(self, ctx: Context, req: ctl.CheckpointRequest) -> ctl.CheckpointResponse:
        return ctl.CheckpointResponse()

    def Status(self, ctx: Context, req: ctl.StatusRequest) -> ctl.StatusResponse:
        return ctl.StatusResponse()

    Stats = None  # declared but not callable


def test_service_from_descriptor_takes_names_and_request_types_from_the_proto() -> None:
    impl = Control()
    svc = Service.from_descriptor(CONTROL, impl)
    assert svc.name == "revenant.v1.Control"
    assert set(svc.methods) == {"Checkpoint", "Status", "Stats"}
    assert svc.methods["Checkpoint"] == (ctl.CheckpointRequest, impl.Checkpoint)
    assert svc.methods["Stats"][0] is ctl.StatsRequest


def test_an_impl_lacking_a_method_is_refused_at_registration() -> None:
    with pytest.raises(TypeError, match=r"NoStats cannot serve revenant\.v1\.Control: no method Stats"):
        Service.from_descriptor(CONTROL, NoStats())


@pytest.mark.parametrize("case", sorted(RAISES))
def test_a_domain_error_crosses_the_edge_as_its_code(serve, case: str) -> None:
    raised, code = RAISES[case]
    srv = serve(Service.from_descriptor(CONTROL, Control()))
    with Client(srv.address, timeout=10) as client, pytest.raises(TtrpcError) as caught:
        ServiceClient(client, CONTROL).Status(ctl.StatusRequest(id=case))
    assert caught.value.code == code
    assert caught.value.message == (raised.message if isinstance(raised, TtrpcError) else str(raised))


def test_a_remote_not_found_is_the_domain_not_found(serve) -> None:
    srv = serve(Service.from_descriptor(CONTROL, Control()))
    with Client(srv.address, timeout=10) as client, pytest.raises(errors.NotFound) as caught:
        ServiceClient(client, CONTROL).Status(ctl.StatusRequest(id="store-missing"))
    assert isinstance(caught.value, WireNotFound)


def test_typed_client_decodes_the_declared_response_and_sends_its_metadata(serve) -> None:
    impl = Control()
    srv = serve(Service.from_descriptor(CONTROL, impl))
    with Client(srv.address, timeout=10) as client:
        control = ServiceClient(client, CONTROL, {NAMESPACE_KEY: "k8s.io"})
        resp = control.Checkpoint(ctl.CheckpointRequest(id="c1"), timeout=5)
        assert isinstance(resp, ctl.CheckpointResponse) and (resp.key, resp.seq) == ("key-of-c1", 7)
        assert isinstance(control.Stats(ctl.StatsRequest(id="c1")), ctl.StatsResponse)
        with pytest.raises(TypeError, match=r"takes revenant\.v1\.CheckpointRequest, not revenant\.v1\.StatusRequest"):
            control.Checkpoint(ctl.StatusRequest(id="c1"))
        with pytest.raises(AttributeError, match="no rpc Restore"):
            control.Restore  # noqa: B018
    assert impl.namespaces == ["k8s.io"]  # the mistyped request never reached the server
