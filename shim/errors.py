"""revenant's domain errors: one set for every part (task service, store, layer codec, snapshotter).

Domain code raises these; only a server's edge turns them into a wire status (ttrpc codes in
shim.ttrpc, gRPC codes in the snapshotter's service). Each kind names the containerd errdefs kind
(and so the status code) it travels as.
"""

from __future__ import annotations


class RevenantError(Exception):
    """Base of every domain error. A plain one travels as Unknown, with its text."""


class Cancelled(RevenantError):
    pass


class NotFound(RevenantError):
    pass


class AlreadyExists(RevenantError):
    pass


class InvalidArgument(RevenantError):
    pass


class FailedPrecondition(RevenantError):
    pass


class Unavailable(RevenantError):
    pass


class DeadlineExceeded(RevenantError):
    pass


class Unimplemented(RevenantError):
    pass


class ResourceExhausted(RevenantError):
    pass


class PermissionDenied(RevenantError):
    pass


class Aborted(RevenantError):
    pass


class OutOfRange(RevenantError):
    pass


class DataLoss(RevenantError):
    pass


class Unauthenticated(RevenantError):
    pass


class Internal(RevenantError):
    pass
