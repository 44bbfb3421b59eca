"""The one exception hierarchy of vmattach and its one mapping to gRPC codes.

Plain Python code raises these; the server interceptor (common/grpcutil.py)
turns them into a google.rpc.Status with an ErrorInfo detail, and the
clients turn a received status back into the same class. No other module
maps exceptions to codes.
"""

from __future__ import annotations

import grpc

DOMAIN = "vmattach.io"


class VmattachError(Exception):
    """Base of every error vmattach reports to a caller."""

    reason = "INTERNAL"

    def __init__(self, message: str, *, reason: str | None = None,
                 metadata: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        if reason:
            self.reason = reason
        self.metadata = dict(metadata or {})


class InvalidArgument(VmattachError):
    """A request field the service refuses. `field` (its path in the request,
    e.g. "connector.initiator") becomes a google.rpc.BadRequest field
    violation next to the ErrorInfo (common/grpcutil.py)."""

    reason = "INVALID_ARGUMENT"

    def __init__(self, message: str, *, reason: str | None = None,
                 metadata: dict[str, str] | None = None, field: str = "",
                 violations: list[tuple[str, str]] | None = None):
        super().__init__(message, reason=reason, metadata=metadata)
        self.field = field
        # (field, description) pairs; one for `field` when none are given
        self.violations = list(violations or ([(field, message)] if field else []))


class NotFound(VmattachError):
    reason = "NOT_FOUND"


class AlreadyExists(VmattachError):
    reason = "ALREADY_EXISTS"


class FailedPrecondition(VmattachError):
    reason = "FAILED_PRECONDITION"


class Aborted(VmattachError):
    """Another operation on the same resource is in flight."""

    reason = "ABORTED"


class ResourceExhausted(VmattachError):
    reason = "RESOURCE_EXHAUSTED"


class Unavailable(VmattachError):
    """A downstream service could not be reached."""

    reason = "UNAVAILABLE"


class DeadlineExceeded(VmattachError):
    reason = "DEADLINE_EXCEEDED"


class Unauthenticated(VmattachError):
    """No credentials, or credentials that are not valid (any more)."""

    reason = "UNAUTHENTICATED"


class PermissionDenied(VmattachError):
    """A known caller that may not do this."""

    reason = "PERMISSION_DENIED"


class BackendError(VmattachError):
    """tgtd, libvirt or the host failed; the message carries no secret."""

    reason = "BACKEND_ERROR"


# The one table. Looked up along the MRO, so a subclass inherits its code.
_CODES: dict[type[VmattachError], grpc.StatusCode] = {
    VmattachError: grpc.StatusCode.INTERNAL,
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    Aborted: grpc.StatusCode.ABORTED,
    ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    BackendError: grpc.StatusCode.INTERNAL,
}
_CLASSES = {code: cls for cls, code in _CODES.items() if cls not in (VmattachError,)}
_CLASSES[grpc.StatusCode.INTERNAL] = BackendError


def status_code(exc: VmattachError) -> grpc.StatusCode:
    for cls in type(exc).__mro__:
        if cls in _CODES:
            return _CODES[cls]
    return grpc.StatusCode.INTERNAL


def error_class(code: grpc.StatusCode) -> type[VmattachError]:
    """The exception class for a status code received from another service."""
    return _CLASSES.get(code, VmattachError)
