"""gRPC boundary of the broker: protobuf in, protobuf out, the bearer token for writes, deadlines."""

from __future__ import annotations

import asyncio
import hmac

import grpc

from broker import convert
from broker.core import Broker
from broker.decode_budget import PixelBudget
from broker.errors import MissingTokenError, WrongTokenError
from broker.types import CatalogueItem
from imgsearch.serving import remaining_timeout_s
from imgsearch.v1 import broker_pb2, broker_pb2_grpc

# An IngestStream chunk is sent on once its messages reach this many bytes, even short of ingest_chunk_size items.
INGEST_CHUNK_MAX_BYTES = 16 * 1024 * 1024


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
    ):
        self._broker = broker
        self._search_timeout_s = search_timeout_s
        self._ingest_timeout_s = ingest_timeout_s
        self._write_token = write_token
        self._chunk = ingest_chunk_size
        self._concurrency = ingest_concurrency
        # Shared by every stream: bounds the broker's memory however many streams run (broker.decode_budget).
        self._ingest_bytes = PixelBudget(max_ingest_bytes_in_flight, unit="bytes")

    def _authorise_write(self, context: grpc.aio.ServicerContext) -> None:
        if self._write_token is None:
            return
        metadata = dict(context.invocation_metadata() or ())
        header = metadata.get("authorization", "")
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
        that repeats an id of a chunk still running waits for it."""
        self._authorise_write(context)
        slots = asyncio.Semaphore(self._concurrency)
        tasks: list[asyncio.Task] = []
        running: list[tuple[asyncio.Task, set[str]]] = []  # chunks not known to be finished, with their ids
        failures: list[BaseException] = []  # of finished chunks (one check per chunk, not a scan of them all)

        def note_failure(task: asyncio.Task) -> None:
            if not task.cancelled() and task.exception() is not None:
                failures.append(task.exception())

        async def run(chunk: list[CatalogueItem], held_bytes: int):
            try:
                return await self._broker.ingest(
                    chunk, timeout_s=remaining_timeout_s(context, self._ingest_timeout_s)
                )
            finally:
                slots.release()
                await self._ingest_bytes.release(held_bytes)

        async def submit(chunk: list[CatalogueItem], chunk_bytes: int) -> None:
            ids = {item.image_id for item in chunk}
            running[:] = [(t, t_ids) for t, t_ids in running if not t.done()]
            earlier = [t for t, t_ids in running if not ids.isdisjoint(t_ids)]
            if earlier:
                await asyncio.wait(earlier)
            await slots.acquire()
            try:
                if failures:
                    raise failures[0]
                # The stream reads no further until the chunk has room among all streams' chunks in flight.
                held = await self._ingest_bytes.acquire(
                    chunk_bytes, timeout_s=remaining_timeout_s(context, self._ingest_timeout_s))
            except BaseException:
                slots.release()
                raise
            task = asyncio.create_task(run(chunk, held))
            task.add_done_callback(note_failure)
            tasks.append(task)
            running.append((task, ids))

        chunk: list[CatalogueItem] = []
        chunk_bytes = 0
        try:
            async for message in request_iterator:
                chunk.append(convert.item_from_proto(message.item))
                chunk_bytes += message.ByteSize()
                # A chunk is also cut by size: 32 images of up to 10 MiB each would hold 320 MiB per chunk.
                if len(chunk) >= self._chunk or chunk_bytes >= INGEST_CHUNK_MAX_BYTES:
                    await submit(chunk, chunk_bytes)
                    chunk, chunk_bytes = [], 0
            if chunk:
                await submit(chunk, chunk_bytes)
            summaries = await asyncio.gather(*tasks)
        except BaseException:
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
