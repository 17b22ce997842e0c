"""ttrpc -- containerd's lightweight RPC protocol -- in pure Python.

codec: sans-IO framing and message layer; errors: status codes and exceptions; server and client:
threaded socket implementations on top of the codec; concurrency: the server's thread helpers.

Serve:   Server([Service.from_descriptor(shim_pb2.DESCRIPTOR.services_by_name["Task"], impl)]).serve(listener)
         where impl.State(ctx: Context, request) -> response message, raising shim.errors kinds
         (NotFound etc.), which the server answers with their status code.
Call:    ServiceClient(Client("unix:///path"), descriptor, {NAMESPACE_KEY: "default"}).State(req, timeout=5)
         or, untyped, Client(...).call("svc.Name", "Method", request, ResponseType, timeout=5, metadata=...)
"""

from shim.ttrpc.client import Client, ServiceClient, parse_address
from shim.ttrpc.errors import (
    Aborted,
    AlreadyExists,
    Cancelled,
    Code,
    DataLoss,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    OutOfRange,
    PermissionDenied,
    ResourceExhausted,
    TtrpcError,
    Unauthenticated,
    Unavailable,
    Unimplemented,
    Unknown,
    error_from_status,
    status_of,
)
from shim.ttrpc.server import NAMESPACE_KEY, Context, Handler, Server, Service

__all__ = [
    "NAMESPACE_KEY",
    "Aborted",
    "AlreadyExists",
    "Cancelled",
    "Client",
    "Code",
    "Context",
    "DataLoss",
    "DeadlineExceeded",
    "FailedPrecondition",
    "Handler",
    "Internal",
    "InvalidArgument",
    "NotFound",
    "OutOfRange",
    "PermissionDenied",
    "ResourceExhausted",
    "Server",
    "Service",
    "ServiceClient",
    "TtrpcError",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "Unknown",
    "error_from_status",
    "parse_address",
    "status_of",
]
