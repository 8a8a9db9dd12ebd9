"""gRPC boundary of the shard: protobuf in, dataclasses to the engine (in thread pools), protobuf out."""

from __future__ import annotations

import asyncio
import functools
import math
import time
from concurrent.futures import ThreadPoolExecutor

from imgsearch.errors import DeadlineExceededError, ImgsearchError
from imgsearch.serving import MessageMetrics, RequestStreams
from imgsearch.v1 import shard_pb2, shard_pb2_grpc
from shard_server import convert
from shard_server.engine import MANY_PARTITIONS, ShardEngine
from shard_server.errors import (
    InvalidRequestError,
    RequestTooLargeError,
    ShardNotReadyError,
    StreamNotCommittedError,
)
from shard_server.partition import ExactScanTooLong
from shard_server.types import Exactness, SearchQuery, SearchResult

# Get requests for at most this many ids run on the event loop; larger ones (random reads of the mapped vectors)
# in the search pool.
INLINE_GET_MAX_IDS = 64
# How long a batch's searches may hold the event loop; the rest of the batch goes to the search pool, in jobs of
# about as long (_answer_batch).
BATCH_LOOP_SLICE_S = 0.005


class ShardServicer(shard_pb2_grpc.ShardServiceServicer):
    def __init__(self, engine: ShardEngine, search_pool: ThreadPoolExecutor, write_pool: ThreadPoolExecutor):
        self.engine = engine
        self._search_pool = search_pool
        self._write_pool = write_pool
        self.search_streams = RequestStreams()  # ended by GrpcService.stop
        self._stream_metrics = MessageMetrics(convert.SERVICE_NAME, "SearchStream")

    def _ready(self) -> None:
        if not self.engine.loaded:
            raise ShardNotReadyError("shard is loading its snapshot and replaying its log; retry shortly")

    async def _run(self, pool, fn, *args, **kwargs):
        return await asyncio.get_running_loop().run_in_executor(pool, functools.partial(fn, *args, **kwargs))

    def _inline(self, query: SearchQuery) -> bool:
        """Whether a search runs on the event loop (ShardConfig.inline_search): not an EXACT scan, and fewer than
        MANY_PARTITIONS partitions (the engine's many-partition path). One over thousands of categories stalled the
        loop, and every other call of the shard with it, for 339 ms at 20,000 categories."""
        if not self.engine.config.inline_search or query.exactness is Exactness.EXACT:
            return False
        partitions = self.engine.partitions
        if not query.categories:  # every category of the shard
            return len(partitions) < MANY_PARTITIONS
        covered: set[str] = set()
        for category in query.categories:  # stops at the MANY_PARTITIONS-th known one
            if category in partitions:
                covered.add(category)
                if len(covered) >= MANY_PARTITIONS:
                    return False
        return True

    async def _search(self, request: shard_pb2.ShardServiceSearchRequest) -> SearchResult:
        query = convert.query_from_proto(request)
        if self._inline(query):
            try:  # see ShardConfig.inline_search
                return self.engine.search(query, exact_rows_limit=self.engine.config.exact_scan_max_rows)
            except ExactScanTooLong:
                pass  # a rare long exact scan (see Partition.search) would stall every other call: on a thread
        return await self._run(self._search_pool, self.engine.search, query)

    async def Search(self, request, context):
        self._ready()
        return convert.result_to_proto(await self._search(request))

    async def _answer_batch(self, request, response):
        """Each search on its own: one refused search (bad input) does not fail the others."""
        self._ready()
        limit = self.engine.config.max_batch_searches
        if len(request.searches) > limit:
            raise RequestTooLargeError(f"{len(request.searches)} searches in one batch; the limit is {limit}")
        loop = asyncio.get_running_loop()
        started = loop.time()
        searches = list(request.searches)
        done = 0
        # Searches on the event loop do not yield: a batch of 256 heavy ones (top_k 1,000 of distinct products)
        # held it for 2.6-3 s, every other call of the shard with it (review of 2026-12-06). Once a batch has held
        # the loop BATCH_LOOP_SLICE_S, the rest goes to the search pool in jobs of about as long (one job per
        # search cost light batches 6-17 % of their throughput; 16 heavy searches a job held single searches
        # back), and the message's time limit can end it between jobs. (A yield between searches was not enough:
        # another call needs several turns of the loop.)
        while done < len(searches) and loop.time() - started <= BATCH_LOOP_SLICE_S:
            try:
                outcome = await self._search(searches[done])
            except ImgsearchError as exc:
                outcome = exc
            convert.add_outcome(response.outcomes, outcome)
            done += 1
        while done < len(searches):
            outcomes = await self._run(self._search_pool, self._searches_in_turn, searches[done:])
            for outcome in outcomes:
                convert.add_outcome(response.outcomes, outcome)
            done += len(outcomes)
        return response

    def _searches_in_turn(self, messages) -> list:
        """The results (or errors) of the first searches of `messages` done within BATCH_LOOP_SLICE_S (at least
        one), in a thread of the search pool: a job of a fixed count of heavy searches kept single searches queued
        behind it in the pool 8-15 times longer (review of 2026-12-06)."""
        outcomes = []
        started = time.perf_counter()
        for message in messages:
            try:
                outcomes.append(self.engine.search(convert.query_from_proto(message)))
            except ImgsearchError as exc:
                outcomes.append(exc)
            if time.perf_counter() - started > BATCH_LOOP_SLICE_S:
                break
        return outcomes

    async def SearchBatch(self, request, context):
        return await self._answer_batch(request, shard_pb2.ShardServiceSearchBatchResponse())

    async def SearchStream(self, request_iterator, context):
        """SearchBatch, one message at a time over a long-lived stream (see the proto). A message refused whole
        ends the stream with its status, as it would fail a SearchBatch call."""
        async for response in self.search_streams.serve(request_iterator, self._stream_answer):
            yield response

    async def _stream_answer(self, request) -> shard_pb2.ShardServiceSearchStreamResponse:
        t0 = self._stream_metrics.started()
        response = shard_pb2.ShardServiceSearchStreamResponse()
        timeout_s = request.timeout_s
        loop = asyncio.get_running_loop()
        # 0: none set (and inf); below 0 or NaN: no time at all, as a call with such a deadline fails at once.
        deadline = None if timeout_s == 0 or timeout_s == math.inf else loop.time() + (
            timeout_s if timeout_s > 0 else 0.0)
        budget = asyncio.timeout_at(deadline)  # what a call's deadline does
        try:
            try:
                if deadline is not None and deadline <= loop.time():
                    raise TimeoutError
                async with budget:
                    await self._answer_batch(request, response)
                # Searches on the event loop do not yield, so the budget cannot cut them short: one that ended
                # past the limit is late all the same (its client stopped waiting).
                if deadline is not None and loop.time() > deadline:
                    raise TimeoutError
            except TimeoutError:
                if deadline is None or loop.time() < deadline:
                    raise  # not this message's limit
                # Every search of the message answered DEADLINE_EXCEEDED, and the stream stays open: its client
                # gave up at the same moment and waits for this answer to use the stream again.
                late = DeadlineExceededError(f"not answered within the message's {timeout_s:.3f} s")
                response.ClearField("outcomes")
                for _ in request.searches:
                    convert.add_outcome(response.outcomes, late)
                self._stream_metrics.handled(t0, late)
                return response
        except BaseException as exc:
            self._stream_metrics.handled(t0, exc)
            raise
        self._stream_metrics.handled(t0)
        return response

    async def Upsert(self, request, context):
        self._ready()
        limit = self.engine.config.max_records_per_request
        if len(request.records) > limit:
            raise RequestTooLargeError(f"{len(request.records)} records in one request; the limit is {limit} "
                                       "(use UpsertStream for bulk loads)")
        records = convert.records_from_proto(request.records)
        if request.validate_only:
            await self._run(self._write_pool, self.engine.validate, records)
            return shard_pb2.UpsertResponse(upserted=0)
        request.DiscardUnknownFields()  # the log holds what was applied, nothing a replay cannot parse
        written = await self._run(self._write_pool, self.engine.upsert, records,
                                  encoded=request.SerializeToString())
        return shard_pb2.UpsertResponse(upserted=written)

    async def UpsertStream(self, request_iterator, context):
        """Buffer the whole stream serialised; only a cleanly half-closed stream is logged (one frame) and applied.

        Decoding, validation and the apply happen batch by batch in the write pool (ShardEngine.upsert_encoded),
        not here: on the event loop they would stall searches, and held as records for the whole stream they took
        several times the stream's size in memory."""
        self._ready()
        chunks: list[bytes] = []
        size = 0
        committed = False
        async for message in request_iterator:
            if committed:
                raise InvalidRequestError("an UpsertStream message after the one that set commit")
            # grpc.aio ends this iterator alike for a half-close and for a client's cancel, deadline or crash (and
            # with neither context.cancelled() nor done() set yet): streams cut short were written. Only a stream
            # whose client said it is complete is.
            committed = message.commit
            message.ClearField("commit")
            message.DiscardUnknownFields()
            encoded = message.SerializeToString()  # wire-compatible with UpsertRequest: frames concatenate
            size += len(encoded)
            if size > self.engine.config.max_stream_bytes:
                raise RequestTooLargeError(
                    f"upsert stream exceeds {self.engine.config.max_stream_bytes} bytes; split it into streams")
            chunks.append(encoded)
        if not committed:
            raise StreamNotCommittedError("the upsert stream ended without its commit message (cut short, or a "
                                          "client older than the commit field); nothing was written")
        # The parts are logged as one frame without being joined (a join of a bulk load's gigabytes holds the GIL
        # and stalled this event loop, and every search on it, for hundreds of milliseconds).
        written = await self._run(self._write_pool, self.engine.upsert_encoded, chunks)
        return shard_pb2.UpsertStreamResponse(upserted=written)

    async def Delete(self, request, context):
        self._ready()
        deleted = await self._run(self._write_pool, self.engine.delete, list(request.image_ids),
                                  version=request.version)
        return shard_pb2.ShardServiceDeleteResponse(deleted=deleted)

    async def Get(self, request, context):
        self._ready()
        image_ids = list(request.image_ids)
        if len(image_ids) <= INLINE_GET_MAX_IDS:  # a few dict lookups and row reads: cheaper on the loop
            records = self.engine.get(image_ids)
        else:
            records = await self._run(self._search_pool, self.engine.get, image_ids)
        return shard_pb2.ShardServiceGetResponse(records=[convert.record_to_proto(r) for r in records])

    async def Stats(self, request, context):
        self._ready()
        stats = await self._run(self._search_pool, self.engine.stats)
        return convert.stats_to_proto(stats)
