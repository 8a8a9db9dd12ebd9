"""Client side of long-lived request streams: one request in flight per open stream, streams reused.

In gRPC Python a message on an open stream costs about a third of a unary call (~0.16 against ~0.41 ms on
loopback: `python -m shard_server.hop_floor --streams 3`, docs/benchmarks.md item 12), and per search the call
is most of what a broker or shard spends. So the searches of ShardClient (ShardService.SearchStream) and of the
async BrokerClient (BrokerService.SearchStream) travel as messages over streams kept open: each request takes an
idle stream (or opens one), writes one message, reads one answer and gives the stream back.

Each message carries its time limit, and the server answers DEADLINE_EXCEEDED when it passes, as a call's
deadline would end the call. A request that gives up at its limit leaves that late answer to be read in the
background before its stream carries another request, so a reply is never read by the wrong request, and the
server counts the search as DEADLINE_EXCEEDED (a cancelled stream is counted CANCELLED, which the error-ratio
alert leaves out). A request whose caller is cancelled, or that fails otherwise, drops its stream."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc

from imgsearch.errors import (
    DeadlineExceededError,
    ResourceExhaustedError,
    TooManyStreamsError,
    UnavailableError,
    from_rpc_error,
    from_status,
)

# After a server answered with UNIMPLEMENTED (older than its client, during a rolling upgrade), requests go by
# unary calls for this long, then the stream is tried again.
UNIMPLEMENTED_RETRY_S = 60.0
# When the server ends a new stream before its first message is sent, grpc.aio can report INTERNAL "Internal error
# from Core" in place of the server's status (a lost race: 5 in 2,000 fresh streams to a server without the
# method, on a loaded 2-core box). That request goes by a unary call, which gets the server's true answer, and
# streams stay off for this long: about as long as a rolling upgrade's step, short if the server did have them.
UNKNOWN_REFUSAL_RETRY_S = 5.0
# After a server refused a new stream because it holds as many as it allows (TooManyStreamsError), requests go by
# unary calls for this long.
TOO_MANY_STREAMS_RETRY_S = 5.0
# Open streams kept for reuse at most; more exist only while that many requests are in flight at once.
MAX_IDLE_STREAMS = 16
# A stream carries requests for this long at most, then is closed when it is next idle: new streams are how a
# client's load moves to servers added behind a load balancer (a stream stays with the server it started on).
MAX_STREAM_AGE_S = 60.0
# How often the idle streams are checked for their age (at a request's turn: a client with no requests closes
# none; its server ends streams idle for STREAM_IDLE_LIMIT_S, imgsearch/serving.py).
IDLE_CHECK_S = 5.0
# How long a stream whose request gave up at its time limit waits in the background for the server's late answer
# (DEADLINE_EXCEEDED, sent at the same limit counted from the message's arrival) before it is dropped.
LATE_ANSWER_WAIT_S = 1.0
# Failures of a stream that sat idle, after which the request goes again over a new stream: the server ended it
# meanwhile (it restarted, or ended its streams to shut down). Only for read-only requests.
_STALE_STREAM_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)


@dataclass(eq=False)
class _Stream:
    call: grpc.aio.StreamStreamCall
    opened_at: float  # event-loop time


def _too_many_streams(metadata) -> bool:
    return any(key == TooManyStreamsError.metadata_key for key, _ in (metadata or ()))


def _retrieve(task: asyncio.Task) -> None:
    """Mark a read's outcome as seen (a read left behind fails later: no "exception was never retrieved")."""
    if not task.cancelled():
        task.exception()


class StreamPool:
    """Open streams of one bidirectional method, each with at most one request in flight."""

    def __init__(self, open_stream: Callable[[], grpc.aio.StreamStreamCall], *, peer: str,
                 max_message_bytes: int, enabled: bool = True):
        self._open_stream = open_stream
        self._peer = peer
        self._max_message_bytes = max_message_bytes
        self._idle: list[_Stream] = []
        self._busy: set[_Stream] = set()
        self._late: set[asyncio.Task] = set()  # streams waiting for a late answer (the loop keeps weak refs)
        self._asking: set[asyncio.Task] = set()  # the tasks of the requests in flight
        self._cut_by_close: set[asyncio.Task] = set()  # those close() cancelled
        self._off_until = float("-inf") if enabled else float("inf")
        self._next_idle_check = float("-inf")
        self._closed = False

    @property
    def idle_streams(self) -> int:
        return len(self._idle)

    def _off_for(self, seconds: float) -> None:
        """Unary calls instead of streams for `seconds` (or longer, if already off for longer)."""
        self._off_until = max(self._off_until, asyncio.get_running_loop().time() + seconds)

    def usable(self) -> bool:
        """False while the streams are off (disabled, or the server had no such method a moment ago): the caller
        makes a unary call instead."""
        return asyncio.get_running_loop().time() >= self._off_until

    async def ask(self, request: Any, *, timeout_s: float) -> Any | None:
        """The server's answer to `request`, over an idle stream or a new one; None when the server has no such
        method (the caller makes a unary call). Failures raise imgsearch.errors types. The request's `timeout_s`
        field is set to the time left before each write (a retry on a new stream gets less)."""
        if self._closed:
            raise UnavailableError(f"the client of {self._peer} is closed")
        size = request.ByteSize()
        if size > self._max_message_bytes:  # grpc fails such a write with INTERNAL "Internal error from Core"
            raise ResourceExhaustedError(f"the request is {size} bytes, over this client's limit of "
                                         f"{self._max_message_bytes} bytes")
        if not timeout_s > 0:  # NaN too: grpc fails a call with such a timeout at once
            raise DeadlineExceededError(f"no time left to ask {self._peer} (timeout {timeout_s} s)")
        loop = asyncio.get_running_loop()
        current = asyncio.current_task()
        if current is not None:
            self._asking.add(current)
        try:
            return await self._ask(request, timeout_s, loop)
        except asyncio.CancelledError:
            # close()'s own cancel, when it was the only one: the caller is not cancelled, its client was closed.
            # A caller cancelled too (its owner's cancel in the same turn) stays cancelled: a retry on
            # UNAVAILABLE kept running after it (review of 2026-12-06).
            if current is not None and current in self._cut_by_close and current.uncancel() == 0:
                raise UnavailableError(f"the client of {self._peer} was closed during the request") from None
            raise
        finally:
            self._asking.discard(current)
            self._cut_by_close.discard(current)

    async def _ask(self, request: Any, timeout_s: float, loop: asyncio.AbstractEventLoop) -> Any | None:
        deadline = loop.time() + timeout_s
        while True:
            remaining_s = deadline - loop.time()
            if remaining_s <= 0:
                raise DeadlineExceededError(f"{self._peer} did not answer within {timeout_s:.3f} s")
            request.timeout_s = remaining_s
            stream = self._take_idle()
            reused = stream is not None
            if stream is None:
                stream = _Stream(call=self._open_stream(), opened_at=loop.time())
            call = stream.call
            written = False
            self._busy.add(stream)
            try:
                async with asyncio.timeout_at(deadline):
                    await call.write(request)
                written = True
                # Read in a task of its own: grpc.aio cancels the whole call when a read is cancelled, and at the
                # time limit the stream must live on until the server's late answer is read.
                read = loop.create_task(call.read())
                read.add_done_callback(_retrieve)
                try:
                    await asyncio.wait((read,), timeout=deadline - loop.time())
                except asyncio.CancelledError:
                    read.cancel()
                    raise
                response = read.result() if read.done() else None
            except asyncio.InvalidStateError:  # the call ended before the write (grpc.aio raises this, no status)
                self._busy.discard(stream)
                if reused:
                    continue
                code, details = await call.code(), await call.details()
                if _too_many_streams(await call.trailing_metadata()):
                    self._off_for(TOO_MANY_STREAMS_RETRY_S)
                    return None
                if code is grpc.StatusCode.OK:
                    code = grpc.StatusCode.UNAVAILABLE
                raise from_status(code, details or f"{self._peer} ended the stream") from None
            except TimeoutError:  # the time limit passed during the write: the stream's state is unknown
                self._drop(stream)
                raise DeadlineExceededError(f"{self._peer} did not answer within {timeout_s:.3f} s") from None
            except asyncio.CancelledError:
                self._drop(stream)
                current = asyncio.current_task()
                if current is not None and current in self._cut_by_close:
                    raise  # ask() answers it
                if self._closed and current is not None and not current.cancelling():
                    raise UnavailableError(f"the client of {self._peer} was closed during the request") from None
                raise
            except grpc.RpcError as e:
                self._drop(stream)
                if e.code() is grpc.StatusCode.UNIMPLEMENTED:
                    self._off_until = loop.time() + UNIMPLEMENTED_RETRY_S
                    return None
                if not reused and not written and e.code() is grpc.StatusCode.INTERNAL:
                    self._off_for(UNKNOWN_REFUSAL_RETRY_S)
                    return None
                if not reused and _too_many_streams(e.trailing_metadata()):  # the server holds enough streams
                    self._off_for(TOO_MANY_STREAMS_RETRY_S)
                    return None
                # A write that fails breaks only a stream that was reused (grpc raises INTERNAL "Internal error
                # from Core" for a write to a connection that died while the stream sat idle).
                if reused and (not written or e.code() in _STALE_STREAM_CODES):
                    continue
                raise from_rpc_error(e) from e
            if response is None:  # the time limit passed: its answer is still to come
                self._busy.discard(stream)
                self._wait_for_late_answer(stream, read)
                raise DeadlineExceededError(f"{self._peer} did not answer within {timeout_s:.3f} s")
            if response is grpc.aio.EOF:  # the server ended the stream (shutting down) without answering
                self._drop(stream)
                if reused:
                    continue
                raise UnavailableError(f"{self._peer} ended the stream without answering")
            self._busy.discard(stream)
            self._release(stream)
            return response

    def _take_idle(self) -> _Stream | None:
        now = asyncio.get_running_loop().time()
        if now >= self._next_idle_check:
            # Streams left idle after a burst were only aged when a request next used them, so they stayed open
            # (holding the server's stream slots) and kept the client's requests on their old server one request
            # per stream (review of 2026-12-06): every idle stream past its age is closed now and then.
            self._next_idle_check = now + IDLE_CHECK_S
            for stream in [s for s in self._idle if now - s.opened_at > MAX_STREAM_AGE_S]:
                self._idle.remove(stream)
                stream.call.cancel()
        while self._idle:
            stream = self._idle.pop()
            if not stream.call.done():  # else it ended while idle: the server restarted or shut down
                return stream
        return None

    def _release(self, stream: _Stream) -> None:
        if (self._closed or len(self._idle) >= MAX_IDLE_STREAMS
                or asyncio.get_running_loop().time() - stream.opened_at > MAX_STREAM_AGE_S):
            stream.call.cancel()
        else:
            self._idle.append(stream)

    def _drop(self, stream: _Stream) -> None:
        self._busy.discard(stream)
        stream.call.cancel()

    def _wait_for_late_answer(self, stream: _Stream, read: asyncio.Task) -> None:
        task = asyncio.get_running_loop().create_task(self._late_answer(stream, read))
        self._late.add(task)
        task.add_done_callback(self._late.discard)

    async def _late_answer(self, stream: _Stream, read: asyncio.Task) -> None:
        try:
            await asyncio.wait((read,), timeout=LATE_ANSWER_WAIT_S)
        except asyncio.CancelledError:  # the client is closing
            read.cancel()
            stream.call.cancel()
            raise
        if not read.done() or read.cancelled() or read.exception() is not None or read.result() is grpc.aio.EOF:
            read.cancel()  # no late answer: the stream failed, or the server is stuck
            stream.call.cancel()
            return
        self._release(stream)

    def close(self) -> None:
        """Cancel every stream, those with a request in flight too (its caller gets UNAVAILABLE). The requests in
        flight are cancelled too: a stream's cancel did not always end its read, and 19 of 20 searches in flight
        waited for their time limit, or for ever without one (API review of 2026-12-06)."""
        self._closed = True
        try:
            current = asyncio.current_task()
        except RuntimeError:  # closed outside the event loop
            current = None
        for task in list(self._asking):
            # once: a second close() in the same turn cancelled it twice, and one uncancel left it cancelled
            if task is not current and not task.done() and task not in self._cut_by_close:
                self._cut_by_close.add(task)
                task.cancel()
        for task in list(self._late):
            task.cancel()
        for stream in [*self._busy, *self._idle]:
            stream.call.cancel()
        self._busy.clear()
        self._idle.clear()
