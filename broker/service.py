"""gRPC boundary of the broker: protobuf in, protobuf out, the bearer token for writes, deadlines."""

from __future__ import annotations

import asyncio
import hmac
import logging

import grpc

from broker import convert
from broker.core import Broker
from broker.decode_budget import PixelBudget
from broker.errors import MissingTokenError, WrongTokenError
from broker.types import CatalogueItem
from imgsearch.errors import DeadlineExceededError, ImgsearchError, InternalError, ResourceExhaustedError
from imgsearch.serving import MessageMetrics, RequestStreams, remaining_timeout_s
from imgsearch.v1 import broker_pb2, broker_pb2_grpc

log = logging.getLogger("broker")

# An IngestStream chunk is sent on once its messages reach this many bytes, even short of ingest_chunk_size items.
INGEST_CHUNK_MAX_BYTES = 8 * 1024 * 1024
# An IngestStream waiting for its turn gives up this long (at most a tenth of its deadline) before the deadline.
STREAM_TURN_MARGIN_S = 0.1


class BrokerService(broker_pb2_grpc.BrokerServiceServicer):
    def __init__(
        self,
        broker: Broker,
        *,
        search_timeout_s: float,
        ingest_timeout_s: float,
        write_token: str | None = None,
        ingest_chunk_size: int = 32,
        ingest_concurrency: int = 4,
        max_ingest_bytes_in_flight: int = 128 * 1024 * 1024,
        max_ingest_streams: int = 8,
    ):
        self._broker = broker
        self._search_timeout_s = search_timeout_s
        self._ingest_timeout_s = ingest_timeout_s
        self._write_token = write_token
        self._chunk = ingest_chunk_size
        self._concurrency = ingest_concurrency
        # Shared by every stream: bounds the broker's memory however many streams run (broker.decode_budget).
        self._ingest_bytes = PixelBudget(max_ingest_bytes_in_flight, unit="bytes")
        self._max_streams = max_ingest_streams
        self._streams = asyncio.Semaphore(max_ingest_streams)
        self._streams_waiting = 0  # IngestStreams waiting for a turn (a slow stream gives its turn up to them)
        self.search_streams = RequestStreams()  # ended by GrpcService.stop
        self._stream_metrics = MessageMetrics(broker_pb2.DESCRIPTOR.services_by_name["BrokerService"].full_name,
                                              "SearchStream")

    def _authorise_write(self, context: grpc.aio.ServicerContext) -> None:
        if self._write_token is None:
            return
        headers = [value for key, value in context.invocation_metadata() or () if key == "authorization"]
        if len(headers) > 1:  # which one counts would depend on the order proxies keep: neither does
            raise WrongTokenError("send one authorization header, not several")
        header = headers[0] if headers else ""
        scheme, _, token = header.strip().partition(" ")
        if not header.strip() or (scheme.lower() == "bearer" and not token.strip()):  # no credentials at all
            raise MissingTokenError("writes need `authorization: Bearer <token>` metadata")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            token.strip().encode(), self._write_token.encode()
        ):
            raise WrongTokenError("the bearer token is not valid for writes")

    async def Search(self, request, context):
        query = convert.query_from_proto(request)
        answer = await self._broker.search(
            query, timeout_s=remaining_timeout_s(context, self._search_timeout_s)
        )
        return convert.answer_to_proto(answer)

    async def SearchStream(self, request_iterator, context):
        """Search, one message at a time over a long-lived stream (see the proto). Each search gets its answer or
        its error in its own response message; the stream stays open."""
        async for response in self.search_streams.serve(request_iterator, self._stream_search):
            yield response

    async def _stream_search(self, message) -> broker_pb2.SearchStreamResponse:
        response = broker_pb2.SearchStreamResponse()
        t0 = self._stream_metrics.started()
        # 0: none set, the default (so is inf); below 0 or NaN: no time at all, as a call with such a deadline.
        timeout_s = self._search_timeout_s
        if message.timeout_s != 0:
            timeout_s = min(timeout_s, message.timeout_s) if message.timeout_s > 0 else 0.0
        try:
            if timeout_s <= 0:
                raise DeadlineExceededError(f"no time left for the search (timeout {message.timeout_s} s)")
            query = convert.query_from_proto(message.search)
            budget = asyncio.timeout(timeout_s)  # what a Search call's deadline does to its handler
            try:
                async with budget:
                    answer = await self._broker.search(query, timeout_s=timeout_s)
            except TimeoutError:
                if not budget.expired():
                    raise  # the search's own DEADLINE_EXCEEDED (a DeadlineExceededError is a TimeoutError)
                raise DeadlineExceededError(f"the search did not finish within {timeout_s:.3f} s") from None
        except asyncio.CancelledError as exc:  # the client hung up
            self._stream_metrics.handled(t0, exc)
            raise
        except Exception as exc:  # noqa: BLE001 - answered with its status, as a Search call fails alone
            if not isinstance(exc, ImgsearchError):
                log.exception("unhandled error in SearchStream search", exc_info=exc)
                exc = InternalError(f"internal error: {type(exc).__name__}")
            self._stream_metrics.handled(t0, exc)
            response.error.code = exc.code.value[0]
            response.error.message = str(exc) or exc.code.name
            return response
        self._stream_metrics.handled(t0)
        convert.answer_to_proto(answer, response.result)
        return response

    async def Ingest(self, request, context):
        self._authorise_write(context)
        item = convert.item_from_proto(request.item)
        summary = await self._broker.ingest(
            [item], timeout_s=remaining_timeout_s(context, self._ingest_timeout_s)
        )
        return convert.summary_to_proto(summary)

    async def IngestStream(self, request_iterator, context):
        """Chunks of the stream go through embed + shard upsert + cache concurrently (bounded). Acknowledged
        once every chunk is durable; on an error the chunks already written stay (re-sending is safe: ingest
        is idempotent by image id). An image id sent twice keeps the later item, as in one Ingest: a chunk
        that repeats an id of a chunk still running waits for it.

        Memory: at most max_ingest_streams streams run at once (others wait for a turn within their deadline,
        then RESOURCE_EXHAUSTED); the upload bytes of their chunks in flight share one budget (a chunk waits for
        room, and its stream reads no further meanwhile); each stream also holds the chunk it is filling (cut at
        INGEST_CHUNK_MAX_BYTES) and the message just read."""
        self._authorise_write(context)
        # Given up a little before the caller's deadline, so that the caller is told why (its own
        # DEADLINE_EXCEEDED came first, at the same moment, and the refusal never arrived: review of 2026-12-05).
        wait_s = remaining_timeout_s(context, self._ingest_timeout_s)
        self._streams_waiting += 1
        try:
            async with asyncio.timeout(max(0.0, wait_s - min(STREAM_TURN_MARGIN_S, wait_s / 10))):
                await self._streams.acquire()
        except TimeoutError:
            raise ResourceExhaustedError(
                f"more than {self._max_streams} IngestStreams at once: none ended within the deadline") from None
        finally:
            self._streams_waiting -= 1
        try:
            return await self._ingest_stream(request_iterator, context)
        finally:
            self._streams.release()

    async def _ingest_stream(self, request_iterator, context):
        slots = asyncio.Semaphore(self._concurrency)
        tasks: list[asyncio.Task] = []
        running: list[tuple[asyncio.Task, set[str]]] = []  # chunks not known to be finished, with their ids
        failures: list[BaseException] = []  # of finished chunks (one check per chunk, not a scan of them all)
        failed = asyncio.Event()

        def remaining_s() -> float:
            return remaining_timeout_s(context, self._ingest_timeout_s)

        def chunk_done(task: asyncio.Task, held_bytes: int) -> None:
            # A done callback, not a `finally` in the task: a task cancelled before it ran would skip that, and
            # the bytes would be lost to every later stream.
            slots.release()
            self._ingest_bytes.release_soon(held_bytes)
            if not task.cancelled() and task.exception() is not None:
                failures.append(task.exception())
                failed.set()

        def give_back_if_taken(acquiring: asyncio.Future) -> None:
            if not acquiring.cancelled() and acquiring.exception() is None:
                self._ingest_bytes.release_soon(acquiring.result())

        async def take_bytes(amount: int) -> int | None:
            """Room for a chunk in the shared budget; None when one of the stream's chunks fails meanwhile (its
            error is the stream's answer, not a wait for room that may outlast the deadline)."""
            acquiring = asyncio.ensure_future(self._ingest_bytes.acquire(amount, timeout_s=remaining_s()))
            failure = asyncio.ensure_future(failed.wait())
            try:
                await asyncio.wait({acquiring, failure}, return_when=asyncio.FIRST_COMPLETED)
            except BaseException:  # the stream is cancelled: whatever the acquire gets is given back
                failure.cancel()
                acquiring.cancel()
                acquiring.add_done_callback(give_back_if_taken)
                raise
            failure.cancel()
            if acquiring.done() and not failures:
                return acquiring.result()  # or the budget's DEADLINE_EXCEEDED: no room within the deadline
            acquiring.cancel()  # a chunk failed: that is the answer
            acquiring.add_done_callback(give_back_if_taken)
            return None

        async def submit(chunk: list[CatalogueItem], chunk_bytes: int) -> None:
            ids = {item.image_id for item in chunk}
            running[:] = [(t, t_ids) for t, t_ids in running if not t.done()]
            earlier = [t for t, t_ids in running if not ids.isdisjoint(t_ids)]
            if earlier:
                await asyncio.wait(earlier)
            await slots.acquire()
            try:
                held = None if failures else await take_bytes(chunk_bytes)
                if held is None:
                    raise failures[0]
            except BaseException:
                slots.release()
                raise
            task = asyncio.create_task(
                self._broker.ingest(chunk, timeout_s=remaining_s()))
            task.add_done_callback(lambda t, held=held: chunk_done(t, held))
            tasks.append(task)
            running.append((task, ids))

        chunk: list[CatalogueItem] = []
        chunk_bytes = 0
        messages = aiter(request_iterator)
        loop = asyncio.get_running_loop()
        # By when the chunk being filled must be full (or the stream closed) while other streams wait for a turn.
        chunk_due = loop.time() + self._ingest_timeout_s
        reading: asyncio.Future | None = None
        try:
            while True:
                # Each message within the write timeout (the caller's deadline when shorter): a client that stops
                # sending without closing its stream held one of the max_ingest_streams turns for good, and
                # with them every other stream (review of 2026-12-05). A long stream that keeps sending is not
                # cut short, unless it is too slow to fill a chunk within the write timeout while other streams
                # wait for a turn: clients trickling an item just inside the timeout held every turn (review of
                # 2026-12-06).
                idle_s = remaining_s()
                idle_until = loop.time() + idle_s
                if reading is None:
                    reading = asyncio.ensure_future(anext(messages))
                while not reading.done():
                    wait_s = min(idle_until, chunk_due) - loop.time()
                    if wait_s > 0:
                        await asyncio.wait((reading,), timeout=wait_s)
                        continue
                    if loop.time() >= idle_until:
                        if idle_s < self._ingest_timeout_s:  # the caller's own deadline came first
                            raise DeadlineExceededError("the IngestStream's deadline passed")
                        raise DeadlineExceededError(
                            f"no message on the IngestStream for {idle_s:.1f}s: a stream must keep sending or close")
                    if self._streams_waiting:
                        raise ResourceExhaustedError(
                            f"the IngestStream sent {len(chunk)} items in {self._ingest_timeout_s:g}s while other "
                            f"streams waited for a turn: fill a chunk of {self._chunk} items (or "
                            f"{INGEST_CHUNK_MAX_BYTES >> 20} MiB) within that time, or send a slow feed as Ingest "
                            "calls; the items of the unfilled chunk are not stored")
                    chunk_due = loop.time() + self._ingest_timeout_s  # nobody waits: slow is fine
                try:
                    message = reading.result()
                except StopAsyncIteration:
                    break
                finally:
                    reading = None
                chunk.append(convert.item_from_proto(message.item))
                chunk_bytes += message.ByteSize()
                # A chunk is also cut by size: 32 images of up to 10 MiB each would hold 320 MiB per chunk.
                if len(chunk) >= self._chunk or chunk_bytes >= INGEST_CHUNK_MAX_BYTES:
                    await submit(chunk, chunk_bytes)
                    chunk, chunk_bytes = [], 0
                    chunk_due = loop.time() + self._ingest_timeout_s  # waits for room do not count
            if chunk:
                await submit(chunk, chunk_bytes)
            summaries = await asyncio.gather(*tasks)
        except BaseException:
            if reading is not None:
                reading.cancel()
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        return broker_pb2.IngestStreamResponse(
            ingested=sum(s.ingested for s in summaries), cache_pending=sum(s.cache_pending for s in summaries)
        )

    async def Delete(self, request, context):
        self._authorise_write(context)
        deleted = await self._broker.delete(
            list(request.image_ids), timeout_s=remaining_timeout_s(context, self._ingest_timeout_s)
        )
        return broker_pb2.BrokerServiceDeleteResponse(deleted=deleted)

    async def Stats(self, request, context):
        shards = await self._broker.stats(timeout_s=remaining_timeout_s(context, self._search_timeout_s))
        return convert.stats_to_proto(shards)
