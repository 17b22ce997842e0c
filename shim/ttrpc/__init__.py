"""ttrpc -- containerd's lightweight RPC protocol -- in pure Python.

codec: sans-IO framing and message layer; errors: status codes and exceptions; server and client:
threaded socket implementations on top of the codec; concurrency: the server's thread helpers.

Serve:   Server([Service("containerd.task.v2.Task", {"State": (StateRequest, handler)})]).serve(listener)
         where handler(ctx: Context, request) -> response message, raising NotFound etc. for errors.
Call:    Client("unix:///path").call("svc.Name", "Method", request, ResponseType, timeout=5,
                                     metadata={NAMESPACE_KEY: "default"})
"""

from shim.ttrpc.client import Client, parse_address
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
    "TtrpcError",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "Unknown",
    "error_from_status",
    "parse_address",
]
