"""Errors of the embedding tier (subclasses of the engine-wide hierarchy in imgsearch.errors)."""

from imgsearch.errors import (
    DeadlineExceededError,
    ImgsearchError,
    InvalidArgumentError,
    ResourceExhaustedError,
    UnavailableError,
)


class EmbedderError(ImgsearchError):
    """Base of the embedding tier's errors."""


class InvalidImageError(EmbedderError, InvalidArgumentError):
    """The bytes are not a decodable image (empty, truncated, unknown format)."""


class ImageTooLargeError(EmbedderError, ResourceExhaustedError):
    """The image exceeds the configured byte or pixel limits (decompression bombs included)."""


class EmbedderUnavailableError(EmbedderError, UnavailableError):
    """The embedding service cannot be reached or is not ready."""


class EmbedderTimeoutError(EmbedderError, DeadlineExceededError):
    """The embedding service did not answer within the deadline."""


class EmbedderOverloadedError(EmbedderError, ResourceExhaustedError):
    """The embedding queue holds more work than can be done within the caller's deadline: refused at once
    (load shedding) instead of queued to time out after using the model."""


class InputFileError(EmbedderError, InvalidArgumentError, ValueError):
    """A file the user gave a tool cannot be used (a catalogue, a split list, a checkpoint): the message names it.
    A ValueError too, for callers that catch those."""


class CheckpointImageSizeError(InputFileError):
    """A checkpoint trained on crops of another size than serving's: export and eval take it only when told."""
