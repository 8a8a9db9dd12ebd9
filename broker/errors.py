"""Errors of the broker (subclasses of the engine-wide hierarchy in imgsearch.errors)."""

from imgsearch.errors import (
    DeadlineExceededError,
    ImgsearchError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
)


class BrokerError(ImgsearchError):
    """Base of the broker's errors."""


class InvalidRequestError(BrokerError, InvalidArgumentError):
    """A request field is missing or out of range (top_k, vector dimension, NaN, ids...)."""


class RequestTooLargeError(BrokerError, ResourceExhaustedError):
    """A request exceeds a configured size limit."""


class MissingTokenError(BrokerError, UnauthenticatedError):
    """A write came without the bearer token the broker is configured to require."""


class WrongTokenError(BrokerError, PermissionDeniedError):
    """A write came with a bearer token that is not the configured one."""


class NoShardAvailableError(BrokerError, UnavailableError):
    """Every shard a write or search needed was unreachable."""


class ShardTimeoutError(BrokerError, DeadlineExceededError):
    """A shard the call needed did not answer within what was left of the deadline."""


class WriteWaitTimeoutError(BrokerError, DeadlineExceededError):
    """A write waited past its deadline for an earlier write of the same image id (see broker.idlocks)."""


class DecodeWaitTimeoutError(BrokerError, DeadlineExceededError):
    """An image waited past its deadline for room to be decoded (see broker.decode_budget)."""


class UnknownImageError(BrokerError, NotFoundError):
    """A search by image id named an image that no shard holds."""


class ShardMapError(BrokerError, InvalidArgumentError):
    """The shard map configuration is malformed."""
