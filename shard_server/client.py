"""Async gRPC client of the shard service. Every call takes a timeout; failures raise imgsearch.errors types
(never a bare grpc.RpcError)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterable, Iterable, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from imgsearch.errors import ImgsearchError, from_rpc_error
from imgsearch.request_streams import StreamPool
from imgsearch.serving import client_channel_options
from imgsearch.v1 import shard_pb2, shard_pb2_grpc
from shard_server import convert
from shard_server.convert import SERVICE_NAME
from shard_server.types import Record, SearchQuery, SearchResult, ShardStats


class ShardClient:
    """Searches go over long-lived SearchStream calls, one search or batch in flight per stream (a message on an
    open stream costs a third of a unary call in gRPC Python); everything else is a unary call."""

    def __init__(self, address: str, *, channel_credentials: grpc.ChannelCredentials | None = None,
                 max_message_bytes: int = 64 * 1024 * 1024, search_streams: bool = True):
        self.address = address
        options = client_channel_options(max_message_bytes)
        if channel_credentials is None:
            self._channel = grpc.aio.insecure_channel(address, options=options)
        else:
            self._channel = grpc.aio.secure_channel(address, channel_credentials, options=options)
        self._stub = shard_pb2_grpc.ShardServiceStub(self._channel)
        self._search_streams = StreamPool(self._stub.SearchStream, peer=f"shard {address}",
                                          max_message_bytes=max_message_bytes, enabled=search_streams)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    async def search(self, query: SearchQuery, *, timeout_s: float) -> SearchResult:
        deadline = time.monotonic() + timeout_s
        outcomes = await self._over_stream([query], timeout_s)
        if outcomes is not None:
            if isinstance(outcomes[0], ImgsearchError):
                raise outcomes[0]
            return outcomes[0]
        timeout_s = max(0.0, deadline - time.monotonic())  # after a try of the stream (UNIMPLEMENTED)
        try:
            response = await self._stub.Search(convert.query_to_proto(query), timeout=timeout_s)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from e
        return convert.result_from_proto(response)

    async def search_batch(self, queries: Sequence[SearchQuery], *,
                           timeout_s: float) -> list[SearchResult | ImgsearchError]:
        """Several searches at once: each gets its result, or the typed error that refused it (returned, not
        raised). A failure of the whole (unavailable, deadline, a batch over the shard's limit) raises."""
        deadline = time.monotonic() + timeout_s
        outcomes = await self._over_stream(queries, timeout_s)
        if outcomes is not None:
            return outcomes
        timeout_s = max(0.0, deadline - time.monotonic())  # after a try of the stream (UNIMPLEMENTED)
        try:
            response = await self._stub.SearchBatch(convert.batch_to_proto(queries), timeout=timeout_s)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from e
        return convert.outcomes_from_proto(response)

    async def _over_stream(self, queries: Sequence[SearchQuery],
                           timeout_s: float) -> list[SearchResult | ImgsearchError] | None:
        """The searches' outcomes over a SearchStream; None when the shard has none (the caller makes a unary
        call)."""
        if not self._search_streams.usable():
            return None
        response = await self._search_streams.ask(convert.stream_request_to_proto(queries, timeout_s=timeout_s),
                                                  timeout_s=timeout_s)
        return None if response is None else convert.outcomes_from_proto(response)

    async def upsert(self, records: Sequence[Record], *, timeout_s: float, validate_only: bool = False) -> int:
        """Write records (durable when this returns); with `validate_only`, only raise what the write would."""
        request = shard_pb2.UpsertRequest(records=[convert.record_to_proto(r) for r in records],
                                          validate_only=validate_only)
        try:
            response = await self._stub.Upsert(request, timeout=timeout_s)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from e
        return response.upserted

    async def upsert_stream(self, records: Iterable[Record] | AsyncIterable[Record], *, batch_size: int = 256,
                            timeout_s: float) -> int:
        """One atomic bulk write: visible (and durable) only once the whole stream is acknowledged."""

        async def messages():
            batch: list[shard_pb2.VectorRecord] = []
            if isinstance(records, AsyncIterable):
                async for r in records:
                    batch.append(convert.record_to_proto(r))
                    if len(batch) >= batch_size:
                        yield shard_pb2.UpsertStreamRequest(records=batch)
                        batch = []
            else:
                for r in records:
                    batch.append(convert.record_to_proto(r))
                    if len(batch) >= batch_size:
                        yield shard_pb2.UpsertStreamRequest(records=batch)
                        batch = []
            # The last message commits the stream: one that ends without it (a cancel, a deadline) is not written.
            yield shard_pb2.UpsertStreamRequest(records=batch, commit=True)

        try:
            response = await self._stub.UpsertStream(messages(), timeout=timeout_s)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from e
        return response.upserted

    async def delete(self, image_ids: Sequence[str] | str, *, timeout_s: float, version: int = 0) -> int:
        """Remove these ids (with `version`: only copies written with a lower version; see the proto)."""
        request = shard_pb2.ShardServiceDeleteRequest(image_ids=convert.image_id_list(image_ids), version=version)
        try:
            response = await self._stub.Delete(request, timeout=timeout_s)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from e
        return response.deleted

    async def get(self, image_ids: Sequence[str] | str, *, timeout_s: float) -> list[Record]:
        """The stored records of these image ids that this shard holds."""
        request = shard_pb2.ShardServiceGetRequest(image_ids=convert.image_id_list(image_ids))
        try:
            response = await self._stub.Get(request, timeout=timeout_s)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from e
        return convert.records_from_proto(response.records)

    async def stats(self, *, timeout_s: float) -> ShardStats:
        try:
            response = await self._stub.Stats(shard_pb2.ShardServiceStatsRequest(), timeout=timeout_s)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from e
        return convert.stats_from_proto(response)

    async def health(self, *, timeout_s: float) -> bool:
        """True when the shard reports SERVING (loaded); False while loading or when unreachable."""
        try:
            response = await self._health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME),
                                                timeout=timeout_s)
        except grpc.RpcError:
            return False
        return response.status == health_pb2.HealthCheckResponse.SERVING

    async def close(self) -> None:
        self._search_streams.close()
        await self._channel.close()

    async def __aenter__(self) -> ShardClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
