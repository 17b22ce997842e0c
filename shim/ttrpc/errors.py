"""ttrpc status codes (the gRPC code set) and the exceptions that carry them across the wire.

Handlers raise revenant's domain errors (shim.errors); the server turns them into their status code
at its edge (status_of). The client raises the TtrpcError subclass that matches the code it got back.
Each of those is also the matching domain kind, so `except shim.errors.NotFound` catches a local
NotFound and a remote one alike.
"""

from __future__ import annotations

import enum

from shim import errors


class Code(enum.IntEnum):
    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


class TtrpcError(errors.RevenantError):
    """An RPC failure with a status code, as a client sees it (or a handler that picks a code itself)."""

    code: Code | int = Code.UNKNOWN  # an int for a code this side does not know (kept, not mapped)

    def __init__(self, message: str, code: Code | int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = _as_code(code)

    def __str__(self) -> str:
        return f"{self.message} (ttrpc code {int(self.code)} {_code_name(self.code)})"


class Cancelled(TtrpcError, errors.Cancelled):
    code = Code.CANCELLED


class Unknown(TtrpcError):
    code = Code.UNKNOWN


class InvalidArgument(TtrpcError, errors.InvalidArgument):
    code = Code.INVALID_ARGUMENT


class DeadlineExceeded(TtrpcError, errors.DeadlineExceeded):
    code = Code.DEADLINE_EXCEEDED


class NotFound(TtrpcError, errors.NotFound):
    code = Code.NOT_FOUND


class AlreadyExists(TtrpcError, errors.AlreadyExists):
    code = Code.ALREADY_EXISTS


class PermissionDenied(TtrpcError, errors.PermissionDenied):
    code = Code.PERMISSION_DENIED


class ResourceExhausted(TtrpcError, errors.ResourceExhausted):
    code = Code.RESOURCE_EXHAUSTED


class FailedPrecondition(TtrpcError, errors.FailedPrecondition):
    code = Code.FAILED_PRECONDITION


class Aborted(TtrpcError, errors.Aborted):
    code = Code.ABORTED


class OutOfRange(TtrpcError, errors.OutOfRange):
    code = Code.OUT_OF_RANGE


class Unimplemented(TtrpcError, errors.Unimplemented):
    code = Code.UNIMPLEMENTED


class Internal(TtrpcError, errors.Internal):
    code = Code.INTERNAL


class Unavailable(TtrpcError, errors.Unavailable):
    code = Code.UNAVAILABLE


class DataLoss(TtrpcError, errors.DataLoss):
    code = Code.DATA_LOSS


class Unauthenticated(TtrpcError, errors.Unauthenticated):
    code = Code.UNAUTHENTICATED


_BY_CODE: dict[int, type[TtrpcError]] = {
    cls.code: cls
    for cls in (
        Cancelled,
        Unknown,
        InvalidArgument,
        DeadlineExceeded,
        NotFound,
        AlreadyExists,
        PermissionDenied,
        ResourceExhausted,
        FailedPrecondition,
        Aborted,
        OutOfRange,
        Unimplemented,
        Internal,
        Unavailable,
        DataLoss,
        Unauthenticated,
    )
}


# Domain kind -> the code it travels as (containerd's errdefs mapping). Most specific first: a wire
# error is matched by its own code before this table is consulted.
_CODE_OF: tuple[tuple[type[errors.RevenantError], Code], ...] = (
    (errors.Cancelled, Code.CANCELLED),
    (errors.InvalidArgument, Code.INVALID_ARGUMENT),
    (errors.DeadlineExceeded, Code.DEADLINE_EXCEEDED),
    (errors.NotFound, Code.NOT_FOUND),
    (errors.AlreadyExists, Code.ALREADY_EXISTS),
    (errors.PermissionDenied, Code.PERMISSION_DENIED),
    (errors.ResourceExhausted, Code.RESOURCE_EXHAUSTED),
    (errors.FailedPrecondition, Code.FAILED_PRECONDITION),
    (errors.Aborted, Code.ABORTED),
    (errors.OutOfRange, Code.OUT_OF_RANGE),
    (errors.Unimplemented, Code.UNIMPLEMENTED),
    (errors.Internal, Code.INTERNAL),
    (errors.Unavailable, Code.UNAVAILABLE),
    (errors.DataLoss, Code.DATA_LOSS),
    (errors.Unauthenticated, Code.UNAUTHENTICATED),
)


def status_of(exc: errors.RevenantError) -> tuple[Code | int, str]:
    """The status (code, message) a domain error answers with; a plain RevenantError is Unknown."""
    if isinstance(exc, TtrpcError):
        return exc.code, exc.message
    code = next((c for kind, c in _CODE_OF if isinstance(exc, kind)), Code.UNKNOWN)
    return code, str(exc)


def error_from_status(code: int, message: str) -> TtrpcError:
    """The exception a client raises for a non-OK answer; codes outside the known set keep their value."""
    cls = _BY_CODE.get(code, TtrpcError)
    return cls(message, code if cls is TtrpcError else None)


def _as_code(code: Code | int) -> Code | int:
    try:
        return Code(code)
    except ValueError:
        return int(code)


def _code_name(code: int) -> str:
    try:
        return Code(code).name
    except ValueError:
        return "UNKNOWN_CODE"
