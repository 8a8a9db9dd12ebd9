"""Client side of long-lived request streams: one request in flight per open stream, streams reused.

In gRPC Python a message on an open stream costs about a third of a unary call (~0.16 against ~0.45 ms on
loopback, docs/benchmarks.md item 12), and per search the call is most of what a broker or shard spends. So the
searches of ShardClient (ShardService.SearchStream) and of the async BrokerClient (BrokerService.SearchStream)
travel as messages over streams kept open: each request takes an idle stream (or opens one), writes one message,
reads one answer and gives the stream back. A request that fails or gives up mid-way drops its stream, whose
next message could otherwise be answered with this one's late reply."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import grpc

from imgsearch.errors import DeadlineExceededError, UnavailableError, from_rpc_error, from_status

# After a server answered with UNIMPLEMENTED (older than its client, during a rolling upgrade), requests go by
# unary calls for this long, then the stream is tried again.
UNIMPLEMENTED_RETRY_S = 60.0
# Open streams kept for reuse at most; more exist only while that many requests are in flight at once.
MAX_IDLE_STREAMS = 16
# Failures of a stream that sat idle, after which the request goes again over a new stream: the server ended it
# meanwhile (it restarted, or ended its streams to shut down). Only for read-only requests.
_STALE_STREAM_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)


class StreamPool:
    """Open streams of one bidirectional method, each with at most one request in flight."""

    def __init__(self, open_stream: Callable[[], grpc.aio.StreamStreamCall], *, peer: str, enabled: bool = True):
        self._open_stream = open_stream
        self._peer = peer
        self._idle: list[grpc.aio.StreamStreamCall] = []
        self._off_until = float("-inf") if enabled else float("inf")

    @property
    def idle_streams(self) -> int:
        return len(self._idle)

    def usable(self) -> bool:
        """False while the streams are off (disabled, or the server had no such method a moment ago): the caller
        makes a unary call instead."""
        return asyncio.get_running_loop().time() >= self._off_until

    async def ask(self, request: Any, *, timeout_s: float) -> Any | None:
        """The server's answer to `request`, over an idle stream or a new one; None when the server has no such
        method (the caller makes a unary call). Failures raise imgsearch.errors types."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            call = None
            while self._idle and call is None:
                call = self._idle.pop()
                if call.done():  # ended while idle
                    call = None
            reused = call is not None
            if call is None:
                call = self._open_stream()
            try:
                async with asyncio.timeout_at(deadline):
                    await call.write(request)
                    response = await call.read()
            except asyncio.InvalidStateError:  # the call ended before the write (grpc.aio raises this, no status)
                if reused:
                    continue
                code, details = await call.code(), await call.details()
                if code is grpc.StatusCode.OK:
                    code = grpc.StatusCode.UNAVAILABLE
                raise from_status(code, details or f"{self._peer} ended the stream") from None
            except TimeoutError:
                call.cancel()  # its answer may still come: the stream cannot carry the next request
                raise DeadlineExceededError(f"{self._peer} did not answer within {timeout_s:.3f} s") from None
            except asyncio.CancelledError:
                call.cancel()
                raise
            except grpc.RpcError as e:
                call.cancel()
                if e.code() is grpc.StatusCode.UNIMPLEMENTED:
                    self._off_until = loop.time() + UNIMPLEMENTED_RETRY_S
                    return None
                if reused and e.code() in _STALE_STREAM_CODES:
                    continue
                raise from_rpc_error(e) from e
            if response is grpc.aio.EOF:  # the server ended the stream (shutting down) without answering
                call.cancel()
                if reused:
                    continue
                raise UnavailableError(f"{self._peer} ended the stream without answering")
            if len(self._idle) < MAX_IDLE_STREAMS:
                self._idle.append(call)
            else:
                call.cancel()
            return response

    def close(self) -> None:
        for call in self._idle:
            call.cancel()
        self._idle.clear()
