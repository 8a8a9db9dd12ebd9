"""Write-ahead log: numbered segment files of framed records, fsynced before a write is acknowledged.

Frame: a 4-byte magic, little-endian u32 payload length, u32 CRC32 of the payload, payload. A crash can leave a
torn last frame; replay detects it by its magic, length or CRC and truncates the segment there (that write was
never acknowledged, because acknowledgement waits for fsync). A bad frame is not the end of the log but
corruption of acknowledged writes when its length fits and non-zero bytes follow its end, or when a whole frame
(magic, a length that fits, a CRC that holds) lies anywhere after it: the shard then refuses to start. The magic
is what makes that search possible: a corrupt length field used to hide where the next frame starts, and the
writes after it were cut as a torn tail (review). Its bytes cannot occur in UTF-8 text, and a vector's floats
would have to hold it and a whole checksummed frame after it by chance (or on purpose: a crafted vector in a
write torn by a crash makes the shard refuse to start, with the command that accepts the cut).

Segments written before the magic (``*.wal``, "legacy") are still read, with the checks of their time: a bad
frame followed by non-zero bytes is refused, one that runs past the end is taken for a torn tail. Each load
starts a fresh segment, so they are gone after the first snapshot.

Concurrent writers share fsyncs (group commit): whoever holds the sync lock flushes everything written so far,
and writers whose frame is already covered return at once.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import mmap
import os
import re
import struct
import threading
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from shard_server.errors import WalCorruptError, WalDiskFullError, WalError, WalFailedError

log = logging.getLogger(__name__)

# A frame's header: magic, payload length, CRC32 of the payload.
HEADER = struct.Struct("<4sII")
FRAME_MAGIC = b"\xa5\x1e\xb3\x0f"  # not UTF-8 (a continuation byte after a control character), a tiny float
MAX_FRAME_BYTES = (1 << 32) - 1
SEGMENT_SUFFIX = ".wal2"
# Segments of frames without the magic: payload length, CRC32.
LEGACY_HEADER = struct.Struct("<II")
LEGACY_SEGMENT_SUFFIX = ".wal"
_SEGMENT_NAME = re.compile(r"[0-9]{12}\.wal2?")


def _segment_name(generation: int) -> str:
    return f"{generation:012d}{SEGMENT_SUFFIX}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# Frames up to this size are read into memory while their checksum is verified; bigger ones (bulk writes, up to
# 4 GiB) are verified chunk by chunk and read back from the file in chunks when they are applied.
READ_CHUNK_BYTES = 8 << 20


@dataclass(frozen=True, kw_only=True)
class LogFrame:
    """One checksummed frame of a segment: its payload, in memory or (a big one) where it lies in the file.

    A bulk write's frame read whole used to sit in the replaying shard's memory next to the vectors it carried:
    a restart then needed more memory than the write itself, and a shard under a memory limit could be killed on
    every restart.
    """

    path: Path
    offset: int
    length: int
    data: bytes | None = None

    def chunks(self, chunk_bytes: int | None = None) -> Iterator[bytes]:
        """The payload in pieces of at most ``chunk_bytes`` (default ``READ_CHUNK_BYTES``), cut anywhere."""
        if self.data is not None:
            yield self.data
            return
        chunk_bytes = chunk_bytes or READ_CHUNK_BYTES
        fd = os.open(self.path, os.O_RDONLY)
        try:
            for start in range(0, self.length, chunk_bytes):
                want = min(chunk_bytes, self.length - start)
                chunk = os.pread(fd, want, self.offset + start)
                if len(chunk) != want:
                    raise WalError(f"{self.path}: frame at byte {self.offset} shrank while it was read")
                yield chunk
        finally:
            os.close(fd)

    def read(self) -> bytes:
        return self.data if self.data is not None else b"".join(self.chunks())


def _checksum(f, length: int) -> tuple[int, int]:
    """CRC32 of the next ``length`` bytes of ``f`` read in chunks, and how many bytes there were."""
    crc = got = 0
    buffer = bytearray(min(length, READ_CHUNK_BYTES))
    view = memoryview(buffer)
    while got < length:
        n = f.readinto(view[: min(len(buffer), length - got)])
        if not n:
            break
        crc = zlib.crc32(view[:n], crc)
        got += n
    return crc, got


def read_segment(path: Path, *, truncate_torn_tail: bool, may_end_torn: bool = True) -> Iterator[LogFrame]:
    """Frames of one segment in order; a torn tail ends the segment (and is cut off if asked).

    A torn tail is the frame being written when the process died: only the newest segment can have one
    (`may_end_torn`; older ones were fsynced whole before the next was opened). A bad frame with more log after it
    (see `_torn`), or any bad frame of an older segment, is corruption of acknowledged writes: WalCorruptError,
    and the segment is left as it is."""
    legacy = path.suffix == LEGACY_SEGMENT_SUFFIX
    header_struct = LEGACY_HEADER if legacy else HEADER
    good_until = 0
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        while True:
            header = f.read(header_struct.size)
            if not header:
                break
            what, frame_end = None, None
            if len(header) < header_struct.size:
                what = "torn frame header"
            elif legacy:
                length, crc = LEGACY_HEADER.unpack(header)
            else:
                magic, length, crc = HEADER.unpack(header)
                if magic != FRAME_MAGIC:
                    what = "no frame marker"
            if what is None and length == 0:  # never written (every record has an op code): a zero-filled tail
                what, frame_end = "empty frame (zero-filled tail)", good_until + header_struct.size
            if what is None:
                offset = good_until + header_struct.size
                if length <= READ_CHUNK_BYTES:
                    data = f.read(length)
                    got, actual = len(data), zlib.crc32(data)
                else:
                    data = None
                    actual, got = _checksum(f, length)
                if got < length or actual != crc:
                    what, frame_end = f"torn or corrupt frame (length {length})", offset + length
            if what is not None:
                _torn(path, good_until, size, f, may_end_torn, what, frame_end=frame_end, search=not legacy)
                break
            good_until = offset + length
            yield LogFrame(path=path, offset=offset, length=length, data=data)
    if good_until < size and truncate_torn_tail:
        log.warning("%s: truncating %d bytes of unacknowledged tail", path, size - good_until)
        with open(path, "r+b") as f:
            f.truncate(good_until)
            f.flush()
            os.fsync(f.fileno())


def _older_segment(path: Path, at: int, size: int, what: str) -> WalCorruptError:
    return WalCorruptError(f"{path}: {what} at byte {at} of {size}, in a segment older than the newest one: "
                           "acknowledged writes after it would be lost. The shard does not start; restore the data "
                           "dir from a replica or a backup")


def _torn(path: Path, at: int, size: int, f, may_end_torn: bool, what: str, *, frame_end: int | None,
          search: bool) -> None:
    """Accept a bad frame at byte `at` as the torn tail of a crashed write, or raise WalCorruptError: in an older
    segment; when its length fits and non-zero bytes follow its end (the log went on after it); or, with
    `search` (segments with frame markers), when a whole frame lies anywhere after it."""
    if not may_end_torn:
        raise _older_segment(path, at, size, what)
    if frame_end is not None and frame_end < size and not _only_zeros(f, frame_end, size):
        # After a power loss, unsynced pages can reach the disk out of order, so this can also be a torn tail
        # with a later unacknowledged page written: the operator decides, with the command to accept the cut.
        raise WalCorruptError(f"{path}: {what} at byte {at}, followed by {size - frame_end} more bytes of log: "
                              "a corrupt write with more after it, not a plain torn tail. The shard does not "
                              "start; restore the data dir from a replica or a backup, or, to start without "
                              f"the writes from there on, run `truncate -s {at} {path}`")
    found = _next_frame(f, at + 1, size) if search else None
    if found is not None:  # (the same may follow a power loss, as above)
        raise WalCorruptError(f"{path}: {what} at byte {at}, followed by a whole frame at byte {found} "
                              f"({size - found} bytes of log from there): acknowledged writes would be lost, not "
                              "a plain torn tail. The shard does not start; restore the data dir from a replica "
                              "or a backup, or, to start without the writes from there on, run "
                              f"`truncate -s {at} {path}`")
    log.warning("%s: %s at byte %d (a write torn by a crash, never acknowledged)", path, what, at)


def _next_frame(f, start: int, stop: int) -> int | None:
    """The offset of the first whole frame at or after byte `start`: its marker, a length that fits before
    `stop`, after its end the end of the segment, another marker or zeros (what follows a frame on disk, a torn
    one's or a zero-filled tail's start included), and a CRC that holds; None when there is none.

    The marker is found at memory speed (``mmap.find``), and the checksum is computed only where what follows
    the claimed end looks right: a value that happens to hold the marker in every record of a big torn write
    (a number attribute's low bytes, say) would otherwise cost a checksum of up to the whole segment each."""
    if stop - start < HEADER.size:
        return None
    with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped, memoryview(mapped) as view:
        at = mapped.find(FRAME_MAGIC, start, stop)
        while at >= 0:
            if at + HEADER.size <= stop:
                _, length, crc = HEADER.unpack_from(view, at)
                payload = at + HEADER.size
                end = payload + length
                if (0 < length <= stop - payload and _frame_may_end_at(view, end, stop)
                        and zlib.crc32(view[payload:end]) == crc):
                    return at
            at = mapped.find(FRAME_MAGIC, at + 1, stop)
    return None


def _frame_may_end_at(view: memoryview, end: int, stop: int) -> bool:
    following = bytes(view[end:min(end + len(FRAME_MAGIC), stop)])
    return following in (FRAME_MAGIC[:len(following)], bytes(len(following)))


def _only_zeros(f, start: int, stop: int) -> bool:
    f.seek(start)
    for _ in range(start, stop, READ_CHUNK_BYTES):
        chunk = f.read(READ_CHUNK_BYTES)
        if chunk.strip(b"\0"):
            return False
    return True


class WriteAheadLog:
    """Appends framed payloads to the newest segment; older segments are dropped after a snapshot covers them."""

    def __init__(self, directory: Path):
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self._write_lock = threading.Lock()
        self._sync_lock = threading.Lock()
        self._synced = threading.Condition()  # guards _synced_seq and _syncing; writers wait on it for a fsync
        self._syncing = False
        self._fd: int | None = None
        # Why the log refuses writes: after a failed fsync, or a failed write that could not be cut off, what the
        # file holds is unknown, and anything appended after it could be lost on replay. The descriptor stays open
        # until close(): closing it here could hand its number to another file while a sync leader fsyncs it.
        self._failed: str | None = None
        # Told once, with the reason, when the log fails: the shard server stops the process (fail-stop), since a
        # replica that refuses every write while its health says SERVING is never restarted. Called with the
        # write lock held, so it must only schedule work.
        self.on_failure: Callable[[str], None] | None = None
        self._generation = 0
        self._written_seq = 0
        self._synced_seq = 0
        self._bytes = sum(p.stat().st_size for p in self.segments())

    def segments(self) -> list[Path]:
        """Every segment, oldest first (legacy ones too: they come before the first of the current format). Files
        of other names are not the log's (a copy an operator left, say) and are left alone."""
        paths = [p for p in self.directory.iterdir() if _SEGMENT_NAME.fullmatch(p.name)]
        return sorted(paths, key=self.generation_of)

    @staticmethod
    def generation_of(path: Path) -> int:
        return int(path.name.partition(".")[0])

    def replay(self, after_generation: int) -> Iterator[LogFrame]:
        """Frames of every segment newer than ``after_generation``, oldest first; cuts a torn tail (of the newest
        segment that holds anything: each load starts a fresh segment, so older ones were written whole).
        WalCorruptError when the segments do not follow on from ``after_generation`` one by one (a segment
        lost, or a snapshot's), or an older segment is corrupt."""
        segments = [p for p in self.segments() if self.generation_of(p) > after_generation]
        generations = [self.generation_of(p) for p in segments]
        if generations != list(range(after_generation + 1, after_generation + 1 + len(generations))):
            raise WalCorruptError(
                f"{self.directory}: the log segments after generation {after_generation} are {generations[:10]}, "
                "not the next ones in a row: a segment (or the snapshot that covered the missing ones) is "
                "missing, and the writes in it with it. The shard does not start; restore the data dir from a "
                "replica or a backup")
        written = [p for p in segments if p.stat().st_size > 0]
        for path in segments:
            yield from read_segment(path, truncate_torn_tail=True, may_end_torn=bool(written) and path == written[-1])
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

    def append(self, payload: bytes | Iterable[bytes | memoryview]) -> int:
        """Write one frame and return once it is on disk; returns its sequence number (in-process order).

        ``payload`` may come in parts (one frame, their concatenation): a bulk write of gigabytes is then never
        joined into one bytes object. Joining holds the GIL for the whole copy, which stalls the gRPC event loop
        and every search with it; CRC32 and ``os.write`` release it.
        """
        parts = (payload,) if isinstance(payload, (bytes, bytearray, memoryview)) else tuple(payload)
        size = sum(len(part) for part in parts)
        if not size:  # a frame of length 0 reads as the start of a zero-filled tail
            raise WalError("an empty record cannot be logged")
        if size > MAX_FRAME_BYTES:
            raise WalError(f"record of {size} bytes exceeds the WAL frame limit")
        crc = 0
        for part in parts:
            crc = zlib.crc32(part, crc)
        frame = HEADER.pack(FRAME_MAGIC, size, crc)
        with self._write_lock:
            if self._fd is None or self._failed:
                raise (WalFailedError(self._failed) if self._failed else WalError("write-ahead log is closed"))
            start = os.lseek(self._fd, 0, os.SEEK_END)
            try:
                self._write_all(frame)
                for part in parts:
                    self._write_all(part)
            except OSError as e:
                # A partial frame left in place would swallow every later (acknowledged) frame on replay: the
                # reader takes them for its payload, finds a bad CRC and cuts the segment there. Cut it off now,
                # or refuse all further writes if even that fails.
                try:
                    os.ftruncate(self._fd, start)
                except OSError:
                    self._fail(f"a write failed ({e}) and could not be cut off")
                    raise WalFailedError(self._failed) from e
                if e.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise WalDiskFullError(f"write-ahead log write failed, the disk is full: {e}") from e
                raise WalError(f"write-ahead log write failed: {e}") from e
            self._written_seq += 1
            seq = self._written_seq
            self._bytes += HEADER.size + size
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
        """Return once frame ``seq`` is on disk: one writer (the leader) fsyncs for every frame written so far.

        Writers covered by the leader's fsync are woken together; a new fsync starts only for frames it did not
        cover. (With a plain lock, covered writers left one at a time and, meanwhile, a writer with a single new
        frame started the next fsync ahead of them: on the 2-core box 200 writes from 16 threads took 65-126
        fsyncs instead of ~15, and covered writers waited a whole extra fsync.)
        """
        with self._synced:
            while self._synced_seq < seq:
                if not self._syncing:
                    self._syncing = True
                    break
                self._synced.wait()
            else:
                return  # a concurrent writer's fsync covered this frame
        target = None
        try:
            with self._sync_lock:  # excludes rotate() and close() while the descriptor is in use
                if self._synced_seq >= seq:
                    return  # rotate() synced it meanwhile
                with self._write_lock:
                    written, fd = self._written_seq, self._fd
                    if fd is None or self._failed:
                        raise (WalFailedError(self._failed) if self._failed else WalError("write-ahead log is closed"))
                self._fsync_or_fail(fd, write_locked=False)
                target = written
        finally:
            with self._synced:
                self._syncing = False
                if target is not None:
                    self._synced_seq = max(self._synced_seq, target)
                self._synced.notify_all()  # on failure too: a waiter takes over as the leader and retries

    def rotate(self) -> tuple[int, int]:
        """Close the current segment and start the next one.

        Returns ``(closed_generation, last_seq_in_closed)``: every frame written so far lies in segments up to
        ``closed_generation``; a snapshot that includes them allows :meth:`drop_through` that generation.
        """
        with self._sync_lock, self._write_lock:
            if self._failed:
                raise WalFailedError(self._failed)
            closed = self._generation
            if self._fd is not None:
                self._fsync_or_fail(self._fd, write_locked=True)
                os.close(self._fd)
                self._fd = None
            with self._synced:
                self._synced_seq = self._written_seq
                self._synced.notify_all()
            self._generation += 1
            try:
                self._open_segment()
            except OSError as e:
                self._fail(f"the next segment could not be opened ({e})")
                raise WalError(self._failed) from e
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
            if self._fd is None:
                return
            fd, self._fd = self._fd, None
            try:
                if self._failed:  # its frames' fate is unknown: nothing to sync, no waiter may be acknowledged
                    return
                self._fsync_or_fail(fd, write_locked=True)
                # A writer still waiting for its fsync (a shutdown that outlasted the drain) finds it done,
                # instead of an error for a write that is durable.
                with self._synced:
                    self._synced_seq = self._written_seq
                    self._synced.notify_all()
            finally:
                os.close(fd)

    def _fsync_or_fail(self, fd: int, *, write_locked: bool) -> None:
        """fsync, called with the sync lock held (and the write lock when `write_locked`).

        A failed fsync fails the log for good (fail-stop): the kernel may already have dropped the dirty pages it
        could not write, so a later fsync that succeeds proves nothing about them, and frames acknowledged after a
        lost one would be cut off with it on replay. A restart replays the log and cuts it at the first bad
        frame; no caller was told that frame or any after it was written."""
        try:
            os.fsync(fd)
        except OSError as e:
            with contextlib.nullcontext() if write_locked else self._write_lock:
                self._fail(f"an fsync failed ({e})")
            raise WalError(f"write-ahead log fsync failed: {e}") from e

    def _fail(self, why: str) -> None:
        """Refuse every later write (called with the write lock held)."""
        if self._failed:
            return
        self._failed = f"write-ahead log failed: {why}; writes are refused until the shard restarts"
        log.error("%s", self._failed)
        if self.on_failure is not None:
            self.on_failure(self._failed)

    @property
    def failed(self) -> str | None:
        """Why the log refuses writes for good, or None."""
        return self._failed
