"""Write-ahead log: numbered segment files of framed records, fsynced before a write is acknowledged.

Frame: little-endian u32 payload length, u32 CRC32 of the payload, payload. A crash can leave a torn last frame;
replay detects it by length or CRC and truncates the segment there (that write was never acknowledged, because
acknowledgement waits for fsync). Concurrent writers share fsyncs (group commit): whoever holds the sync lock
flushes everything written so far, and writers whose frame is already covered return at once.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path

from shard_server.errors import WalError

log = logging.getLogger(__name__)

HEADER = struct.Struct("<II")
MAX_FRAME_BYTES = (1 << 32) - 1
SEGMENT_SUFFIX = ".wal"


def _segment_name(generation: int) -> str:
    return f"{generation:012d}{SEGMENT_SUFFIX}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_segment(path: Path, *, truncate_torn_tail: bool) -> Iterator[bytes]:
    """Payloads of one segment in order; a torn or corrupt tail ends the segment (and is cut off if asked)."""
    good_until = 0
    with open(path, "rb") as f:
        while True:
            header = f.read(HEADER.size)
            if not header:
                break
            if len(header) < HEADER.size:
                log.warning("%s: torn frame header at byte %d", path, good_until)
                break
            length, crc = HEADER.unpack(header)
            payload = f.read(length)
            if len(payload) < length or zlib.crc32(payload) != crc:
                log.warning("%s: torn or corrupt frame at byte %d (length %d)", path, good_until, length)
                break
            good_until += HEADER.size + length
            yield payload
        size = f.seek(0, os.SEEK_END)
    if good_until < size and truncate_torn_tail:
        log.warning("%s: truncating %d bytes of unacknowledged tail", path, size - good_until)
        with open(path, "r+b") as f:
            f.truncate(good_until)
            f.flush()
            os.fsync(f.fileno())


class WriteAheadLog:
    """Appends framed payloads to the newest segment; older segments are dropped after a snapshot covers them."""

    def __init__(self, directory: Path):
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self._write_lock = threading.Lock()
        self._sync_lock = threading.Lock()
        self._fd: int | None = None
        self._generation = 0
        self._written_seq = 0
        self._synced_seq = 0
        self._bytes = sum(p.stat().st_size for p in self.segments())

    def segments(self) -> list[Path]:
        return sorted(self.directory.glob("*" + SEGMENT_SUFFIX))

    @staticmethod
    def generation_of(path: Path) -> int:
        return int(path.name[: -len(SEGMENT_SUFFIX)])

    def replay(self, after_generation: int) -> Iterator[bytes]:
        """Payloads of every segment newer than ``after_generation``, oldest first; cuts a torn tail."""
        segments = [p for p in self.segments() if self.generation_of(p) > after_generation]
        for path in segments:
            yield from read_segment(path, truncate_torn_tail=True)
        self._bytes = sum(p.stat().st_size for p in self.segments())

    def open(self, min_generation: int = 1) -> None:
        """Start a fresh segment for appends (never append to a segment that may end in a torn frame)."""
        existing = [self.generation_of(p) for p in self.segments()]
        self._generation = max([min_generation - 1, *existing]) + 1
        self._open_segment()

    def _open_segment(self) -> None:
        path = self.directory / _segment_name(self._generation)
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        _fsync_dir(self.directory)

    @property
    def generation(self) -> int:
        return self._generation

    @property
    def size_bytes(self) -> int:
        return self._bytes

    def append(self, payload: bytes) -> int:
        """Write one frame and return once it is on disk; returns its sequence number (in-process order)."""
        if len(payload) > MAX_FRAME_BYTES:
            raise WalError(f"record of {len(payload)} bytes exceeds the WAL frame limit")
        frame = HEADER.pack(len(payload), zlib.crc32(payload))
        with self._write_lock:
            if self._fd is None:
                raise WalError("write-ahead log is closed")
            try:
                self._write_all(frame)
                self._write_all(payload)
            except OSError as e:
                raise WalError(f"write-ahead log write failed: {e}") from e
            self._written_seq += 1
            seq = self._written_seq
            self._bytes += HEADER.size + len(payload)
        try:
            self._sync(seq)
        except WalError as e:
            e.seq = seq  # written but not known to be durable: the caller must not apply it
            raise
        return seq

    def _write_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = os.write(self._fd, view)
            view = view[n:]

    def _sync(self, seq: int) -> None:
        with self._sync_lock:
            if self._synced_seq >= seq:
                return  # a concurrent writer's fsync already covered this frame
            with self._write_lock:
                target, fd = self._written_seq, self._fd
            try:
                os.fsync(fd)
            except OSError as e:
                raise WalError(f"write-ahead log fsync failed: {e}") from e
            self._synced_seq = target

    def rotate(self) -> tuple[int, int]:
        """Close the current segment and start the next one.

        Returns ``(closed_generation, last_seq_in_closed)``: every frame written so far lies in segments up to
        ``closed_generation``; a snapshot that includes them allows :meth:`drop_through` that generation.
        """
        with self._sync_lock, self._write_lock:
            closed = self._generation
            if self._fd is not None:
                os.fsync(self._fd)
                os.close(self._fd)
            self._synced_seq = self._written_seq
            self._generation += 1
            self._open_segment()
            return closed, self._written_seq

    def drop_through(self, generation: int) -> None:
        for path in self.segments():
            if self.generation_of(path) <= generation:
                size = path.stat().st_size
                path.unlink()
                self._bytes -= size
        _fsync_dir(self.directory)

    def close(self) -> None:
        with self._sync_lock, self._write_lock:
            if self._fd is not None:
                os.fsync(self._fd)
                os.close(self._fd)
                self._fd = None
