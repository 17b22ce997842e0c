"""ttrpc status codes (the gRPC code set) and the exceptions that carry them across the wire.

A handler raises a TtrpcError subclass to answer with its code; the client raises the subclass that
matches the code it got back, so `except NotFound` works the same on both sides.
"""

from __future__ import annotations

import enum


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


class TtrpcError(Exception):
    """An RPC failure with a status code. Raise it (or a subclass) from a handler to choose the code."""

    code: Code | int = Code.UNKNOWN  # an int for a code this side does not know (kept, not mapped)

    def __init__(self, message: str, code: Code | int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = _as_code(code)

    def __str__(self) -> str:
        return f"{self.message} (ttrpc code {int(self.code)} {_code_name(self.code)})"


class Cancelled(TtrpcError):
    code = Code.CANCELLED


class Unknown(TtrpcError):
    code = Code.UNKNOWN


class InvalidArgument(TtrpcError):
    code = Code.INVALID_ARGUMENT


class DeadlineExceeded(TtrpcError):
    code = Code.DEADLINE_EXCEEDED


class NotFound(TtrpcError):
    code = Code.NOT_FOUND


class AlreadyExists(TtrpcError):
    code = Code.ALREADY_EXISTS


class PermissionDenied(TtrpcError):
    code = Code.PERMISSION_DENIED


class ResourceExhausted(TtrpcError):
    code = Code.RESOURCE_EXHAUSTED


class FailedPrecondition(TtrpcError):
    code = Code.FAILED_PRECONDITION


class Aborted(TtrpcError):
    code = Code.ABORTED


class OutOfRange(TtrpcError):
    code = Code.OUT_OF_RANGE


class Unimplemented(TtrpcError):
    code = Code.UNIMPLEMENTED


class Internal(TtrpcError):
    code = Code.INTERNAL


class Unavailable(TtrpcError):
    code = Code.UNAVAILABLE


class DataLoss(TtrpcError):
    code = Code.DATA_LOSS


class Unauthenticated(TtrpcError):
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
