"""Errors of the shard tier; each maps to a gRPC status through :mod:`imgsearch.errors`."""

from __future__ import annotations

from imgsearch.errors import (
    FailedPreconditionError,
    ImgsearchError,
    InternalError,
    InvalidArgumentError,
    ResourceExhaustedError,
    UnavailableError,
)


class ShardError(ImgsearchError):
    """Base of the shard server's own errors."""


class InvalidRequestError(ShardError, InvalidArgumentError):
    """Malformed input: wrong dimension, NaN/Inf, zero vector, bad top_k, unknown filter field..."""


class RequestTooLargeError(ShardError, ResourceExhaustedError):
    """More records or bytes in one request than the shard accepts."""


class ShardNotReadyError(ShardError, UnavailableError):
    """The shard is still loading its snapshot and replaying its write-ahead log."""


class StreamNotCommittedError(ShardError, FailedPreconditionError):
    """An UpsertStream ended without its commit message: cut short (cancelled, past its deadline, its client
    gone), so nothing of it is written."""


class LoadInterruptedError(ShardError, UnavailableError):
    """The shard was told to stop while it was still loading its snapshot and replaying its log."""


class SnapshotCorruptError(ShardError, FailedPreconditionError):
    """A snapshot file is missing or its sha256 does not match the manifest: the shard refuses to load it."""


class WalError(ShardError, InternalError):
    """The write-ahead log could not be written or read."""


class WalDiskFullError(WalError):
    """A write did not fit on the log's disk (ENOSPC, or a quota): it was cut off, nothing of it is kept, and the
    log takes writes again once there is room. RESOURCE_EXHAUSTED, so callers can tell it from a fault of ours."""

    code = ResourceExhaustedError.code


class WalFailedError(WalError):
    """The log failed earlier (an fsync error) and refuses every write until the shard restarts, which it is
    doing (fail-stop): UNAVAILABLE, so callers retry elsewhere or later, as for a shard that is down."""

    code = UnavailableError.code


class WalCorruptError(WalError):
    """The log on disk lost acknowledged writes (a corrupt frame before its end, a missing segment): the shard
    refuses to start rather than serve without them."""
