"""Search coalescing per shard replica: searches that arrive while a call to the replica is in flight queue up
and go out together, as one SearchBatch call, as soon as it returns.

With one search at a time nothing queues and each search is one plain Search call, as without coalescing, so a
lone client's latency does not change. Under load the searches that arrive during a call share the next one: one
gRPC round trip, one message each way and one handler run on the shard for the lot instead of one each. In
Python a gRPC call costs more CPU than searching a partition (docs/benchmarks.md, "Where targets are missed"), so
the calls saved are most of a loaded broker's and shard's work. The shard searches on its event loop one search
at a time anyway, so searches waiting behind a call to it would have waited inside the shard instead.

Each queued search keeps its own deadline (it fails with DEADLINE_EXCEEDED when it passes, whatever its batch
does), its own result and its own error: the shard answers each search of a batch separately.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import grpc

from broker.metrics import SHARD_CALL_SEARCHES
from imgsearch.errors import DeadlineExceededError, ImgsearchError, from_status
from shard_server.client import ShardClient
from shard_server.types import SearchQuery, SearchResult

# After a replica answered SearchBatch with UNIMPLEMENTED, it is tried again this much later (the shard may have
# been upgraded meanwhile).
BATCHES_RETRY_S = 60.0


@dataclass(frozen=True, kw_only=True)
class _Queued:
    query: SearchQuery
    waiter: asyncio.Future
    deadline: float  # event-loop time


def _expire(waiter: asyncio.Future, timeout_s: float) -> None:
    if not waiter.done():
        waiter.set_exception(DeadlineExceededError(f"no answer from the shard within {timeout_s:.3f} s "
                                                   "(queued behind earlier searches)"))


class SearchCoalescer:
    """Searches of one shard replica, with at most `max_in_flight` calls to it at a time; the searches beyond
    that queue and leave as batches of at most `max_batch` when a call returns."""

    def __init__(self, client: ShardClient, *, max_in_flight: int = 1, max_batch: int = 64):
        if max_in_flight < 1 or max_batch < 1:
            raise ValueError("max_in_flight and max_batch must be at least 1")
        self.client = client
        self.max_in_flight = max_in_flight
        self.max_batch = max_batch
        self._in_flight = 0
        self._queue: deque[_Queued] = deque()
        # Set when the replica answered SearchBatch with UNIMPLEMENTED (a shard older than the broker, during a
        # rolling upgrade): every search is then its own call again, until SearchBatch is tried once more.
        self._batches_off_until = float("-inf")
        self._sending: set[asyncio.Task] = set()  # the event loop keeps only weak references to tasks

    @property
    def _batches_supported(self) -> bool:
        return asyncio.get_running_loop().time() >= self._batches_off_until

    async def search(self, query: SearchQuery, *, timeout_s: float) -> SearchResult:
        if self._in_flight < self.max_in_flight or not self._batches_supported:
            self._in_flight += 1
            try:
                return await self._one(query, timeout_s)
            finally:
                self._in_flight -= 1
                self._send_queued()
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        self._queue.append(_Queued(query=query, waiter=waiter, deadline=loop.time() + timeout_s))
        timer = loop.call_later(timeout_s, _expire, waiter, timeout_s)
        try:
            return await waiter
        finally:
            timer.cancel()

    def _send_queued(self) -> None:
        # Without batches, what is queued leaves at once, each search its own call (as new searches do then):
        # under load a call is always in flight, and the queue would wait for its searches' deadlines.
        while self._queue and (self._in_flight < self.max_in_flight or not self._batches_supported):
            batch: list[_Queued] = []
            while self._queue and len(batch) < self.max_batch:
                queued = self._queue.popleft()
                if not queued.waiter.done():  # expired or cancelled while queued: nobody waits for it
                    batch.append(queued)
            if not batch:
                return
            self._in_flight += 1
            task = asyncio.get_running_loop().create_task(self._send(batch))
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)

    async def _send(self, batch: Sequence[_Queued]) -> None:
        try:
            await self._answer(batch)
        except BaseException as exc:  # noqa: BLE001 - every waiter must hear of it, whatever it is
            error = exc if isinstance(exc, ImgsearchError) else ImgsearchError(f"{type(exc).__name__}: {exc}")
            for queued in batch:
                if not queued.waiter.done():
                    queued.waiter.set_exception(from_status(error.code, str(error)))
            if isinstance(exc, asyncio.CancelledError):
                raise
        finally:
            self._in_flight -= 1
            self._send_queued()

    async def _answer(self, batch: Sequence[_Queued]) -> None:
        loop = asyncio.get_running_loop()
        # The call lasts as long as its most patient search; the others expire on their own timers.
        timeout_s = max(q.deadline for q in batch) - loop.time()
        outcomes = None
        if len(batch) > 1 and self._batches_supported:
            SHARD_CALL_SEARCHES.observe(len(batch))
            try:
                outcomes = await self.client.search_batch([q.query for q in batch], timeout_s=timeout_s)
            except ImgsearchError as exc:
                # UNIMPLEMENTED: a shard without SearchBatch. RESOURCE_EXHAUSTED: a batch over the shard's limit
                # (--shard-batch-max-searches above its --max-batch-searches); each search alone may still pass.
                if exc.code not in (grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.RESOURCE_EXHAUSTED):
                    raise
                if exc.code is grpc.StatusCode.UNIMPLEMENTED:
                    self._batches_off_until = loop.time() + BATCHES_RETRY_S
        if outcomes is None:  # one search, or a batch the shard would not take: each search on its own
            outcomes = await asyncio.gather(
                *(self._one(q.query, q.deadline - loop.time()) for q in batch), return_exceptions=True
            )
        for queued, outcome in zip(batch, outcomes, strict=True):
            if queued.waiter.done():
                continue
            if isinstance(outcome, BaseException):
                queued.waiter.set_exception(outcome)
            else:
                queued.waiter.set_result(outcome)

    async def _one(self, query: SearchQuery, timeout_s: float) -> SearchResult:
        SHARD_CALL_SEARCHES.observe(1)
        return await self.client.search(query, timeout_s=max(0.001, timeout_s))
