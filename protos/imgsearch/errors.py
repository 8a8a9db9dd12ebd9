"""One exception hierarchy for the whole engine, mapped to gRPC status codes in one place.

Packages raise subclasses of these (``shard_server.errors``, ``embedder.errors``, ``broker.errors``); the server
plumbing in :mod:`imgsearch.serving` turns any :class:`ImgsearchError` into the matching gRPC status, and the
clients turn gRPC statuses back into these types with :func:`from_rpc_error`.
"""

from __future__ import annotations

import grpc


def quoted(value: object, limit: int = 80) -> str:
    """A caller's value for an error message: its repr, cut to `limit` characters. A message quoting a
    20,000-character id whole lost the rest of its text to the status cut (imgsearch.serving.status_details)."""
    text = str(value)
    return repr(text) if len(text) <= limit else f"{text[:limit]!r}... ({len(text):,} characters)"


class ImgsearchError(Exception):
    """Base of every error the engine reports to a caller."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class InvalidArgumentError(ImgsearchError, ValueError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class MalformedRequestError(InvalidArgumentError):
    """The request bytes are not a valid protobuf message of the method's request type."""


class NotFoundError(ImgsearchError, LookupError):
    code = grpc.StatusCode.NOT_FOUND


class ResourceExhaustedError(ImgsearchError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class TooManyStreamsError(ResourceExhaustedError):
    """A long-lived request stream refused when it opens: the server holds as many as it allows. The refusal
    carries this trailing metadata key, so that a client tells it from a message refused whole (also
    RESOURCE_EXHAUSTED) and sends its request as a unary call."""

    metadata_key = "imgsearch-too-many-streams"


class UnavailableError(ImgsearchError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceededError(ImgsearchError, TimeoutError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class PermissionDeniedError(ImgsearchError):
    code = grpc.StatusCode.PERMISSION_DENIED


class UnauthenticatedError(ImgsearchError):
    code = grpc.StatusCode.UNAUTHENTICATED


class FailedPreconditionError(ImgsearchError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class InternalError(ImgsearchError):
    code = grpc.StatusCode.INTERNAL


_BY_CODE: dict[grpc.StatusCode, type[ImgsearchError]] = {
    cls.code: cls
    for cls in (
        InvalidArgumentError,
        NotFoundError,
        ResourceExhaustedError,
        UnavailableError,
        DeadlineExceededError,
        PermissionDeniedError,
        UnauthenticatedError,
        FailedPreconditionError,
        InternalError,
    )
}


_CODE_BY_NUMBER = {c.value[0]: c for c in grpc.StatusCode}


def from_status(code: grpc.StatusCode | int, message: str = "") -> ImgsearchError:
    """The typed error for a status code (a ``grpc.StatusCode`` or its number, as google.rpc.Code carries it)."""
    if not isinstance(code, grpc.StatusCode):
        code = _CODE_BY_NUMBER.get(code, grpc.StatusCode.UNKNOWN)
    exc = _BY_CODE.get(code, ImgsearchError)(message or code.name)
    exc.code = code
    return exc


def from_rpc_error(err: grpc.RpcError) -> ImgsearchError:
    """The typed error for a failed call (clients raise this instead of a bare ``grpc.RpcError``)."""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = err.details() if hasattr(err, "details") else str(err)
    return from_status(code, details)
