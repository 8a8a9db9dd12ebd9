"""ShardService.SearchStream: the broker's searches travel over long-lived streams to the shards (ShardClient).

Against a real shard server: stream answers equal unary answers, a message refused whole ends only its stream,
a restarted shard and a shard without SearchStream are searched as before, a shutdown does not wait for open
streams, each message counts as one call in the metrics. With a stand-in servicer on a real gRPC server (unit
tests of the client): a shard that does not answer in time."""

import asyncio
import time

import grpc
import numpy as np
import pytest
from conftest import settle
from prometheus_client import REGISTRY
from test_search_batch import _queries  # the same mix of categories, filters and options

from imgsearch import request_streams
from imgsearch.errors import DeadlineExceededError, ImgsearchError
from imgsearch.serving import ServerOptions, start_grpc_service
from imgsearch.v1 import common_pb2, shard_pb2, shard_pb2_grpc
from shard_server import convert, synthetic
from shard_server.client import ShardClient
from shard_server.config import ShardConfig
from shard_server.server import start_shard_server
from shard_server.types import Condition, Equals, Exactness, Filter, Hit, SearchQuery, SearchResult

DIM = 32


def _config(tmp_path, **overrides) -> ShardConfig:
    return ShardConfig(**{"data_dir": tmp_path / "shard", "dimension": DIM, "max_top_k": 100,
                          "max_batch_searches": 8, **overrides})


async def _load(client: ShardClient) -> synthetic.SyntheticCatalogue:
    catalogue = synthetic.SyntheticCatalogue(dim=DIM, clusters=4)
    for i, category in enumerate("abc"):
        await client.upsert(catalogue.records(100 * i, 100 * (i + 1), category=category), timeout_s=10)
    return catalogue


async def _loaded_query(client: ShardClient) -> SearchQuery:
    """Load the catalogue through `client`; a query of category "a"."""
    catalogue = await _load(client)
    return SearchQuery(vector=catalogue.queries(1)[0], top_k=5, categories=("a",))


@pytest.fixture
async def shard(tmp_path):
    handle = await start_shard_server(_config(tmp_path))
    client = ShardClient(f"127.0.0.1:{handle.port}")
    catalogue = await _load(client)
    yield handle, client, catalogue
    await client.close()
    await handle.stop(snapshot=False)



def _handled(method: str, code: str) -> float:
    return REGISTRY.get_sample_value("grpc_server_handled_total", {
        "grpc_type": "bidi_stream" if method == "SearchStream" else "unary",
        "grpc_service": "imgsearch.v1.ShardService", "grpc_method": method, "grpc_code": code}) or 0.0


async def test_stream_answers_equal_unary_answers(shard):
    _handle, client, catalogue = shard
    queries = _queries(catalogue, 40)
    bad = SearchQuery(vector=np.ones(DIM, np.float32), top_k=5,
                      filter=Filter(all_of=(Condition(field="size", predicate=Equals(value="XL")),)))
    async with ShardClient(client.address, search_streams=False) as unary:
        unary0, stream0 = _handled("Search", "OK"), _handled("SearchStream", "OK")
        expected = [await unary.search(q, timeout_s=5) for q in queries]
        assert _handled("Search", "OK") - unary0 == 40
        assert [await client.search(q, timeout_s=5) for q in queries] == expected
        # concurrent searches: one stream each, each answered with its own result
        assert list(await asyncio.gather(*(client.search(q, timeout_s=5) for q in queries))) == expected
        outcomes = await client.search_batch([*queries[:3], bad], timeout_s=5)
        assert outcomes[:3] == expected[:3]
        refused = (await unary.search_batch([bad], timeout_s=5))[0]
        assert (type(outcomes[3]), str(outcomes[3])) == (type(refused), str(refused))
        assert "unknown filter field 'size'" in str(refused)
    assert _handled("SearchStream", "OK") - stream0 == 81  # one call per message, none for the streams
    assert _handled("Search", "OK") - unary0 == 40
    assert 1 < client._search_streams.idle_streams <= request_streams.MAX_IDLE_STREAMS


async def test_a_message_refused_whole_ends_only_its_stream(shard):
    _handle, client, catalogue = shard
    refused0 = _handled("SearchStream", "RESOURCE_EXHAUSTED")
    with pytest.raises(ImgsearchError) as info:
        await client.search_batch(_queries(catalogue, 9), timeout_s=5)
    assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "the limit is 8" in str(info.value)
    assert _handled("SearchStream", "RESOURCE_EXHAUSTED") - refused0 == 1
    assert len(await client.search_batch(_queries(catalogue, 8), timeout_s=5)) == 8


async def test_a_restarted_shard_is_searched_over_a_new_stream(tmp_path, free_port):
    config = _config(tmp_path, port=free_port())
    handle = await start_shard_server(config)
    async with ShardClient(f"127.0.0.1:{handle.port}") as client:
        catalogue = await _load(client)
        query = _queries(catalogue, 1)[0]
        before = await client.search(query, timeout_s=5)
        assert client._search_streams.idle_streams == 1  # left open, and ended by the stop below
        await handle.stop()
        handle = await start_shard_server(config)
        try:
            assert await client.search(query, timeout_s=5) == before
        finally:
            await handle.stop(snapshot=False)


async def test_a_shutdown_does_not_wait_for_open_streams(tmp_path):
    # grpc's graceful stop waits for every open call up to its grace period: an idle search stream held every
    # shard stop for the whole grace.
    handle = await start_shard_server(_config(tmp_path, shutdown_grace_s=20.0))
    async with ShardClient(f"127.0.0.1:{handle.port}") as client:
        catalogue = await _load(client)
        await asyncio.gather(*(client.search(q, timeout_s=5) for q in _queries(catalogue, 3)))
        assert client._search_streams.idle_streams == 3
        started = time.monotonic()
        await handle.stop(snapshot=False)
        assert time.monotonic() - started < 5.0
        with pytest.raises(ImgsearchError) as info:
            await client.search(_queries(catalogue, 1)[0], timeout_s=2)
        assert info.value.code == grpc.StatusCode.UNAVAILABLE


class OldShard(shard_pb2_grpc.ShardServiceServicer):
    """A shard from before SearchStream: Search only (the generated servicer's default answers the rest)."""

    def __init__(self, answer: shard_pb2.ShardServiceSearchResponse, delay_s: float = 0.0):
        self.answer = answer
        self.delay_s = delay_s
        self.searches = 0

    async def Search(self, request, context):
        self.searches += 1
        await asyncio.sleep(self.delay_s)
        return self.answer


class SlowStreamShard(OldShard):
    """Answers SearchStream messages after `delay_s` (the first `slow` of them; the rest at once)."""

    def __init__(self, answer, delay_s: float, slow: int):
        super().__init__(answer)
        self.stream_delay_s = delay_s
        self.slow = slow

    async def SearchStream(self, request_iterator, context):
        async for request in request_iterator:
            if self.slow > 0:
                self.slow -= 1
                await asyncio.sleep(self.stream_delay_s)
            response = shard_pb2.ShardServiceSearchStreamResponse()
            for _ in request.searches:
                response.outcomes.add().result.CopyFrom(self.answer)
            yield response


async def _serve(servicer):
    def register(server):
        shard_pb2_grpc.add_ShardServiceServicer_to_server(servicer, server)
        return [convert.SERVICE_NAME]

    service = await start_grpc_service(ServerOptions(host="127.0.0.1", port=0), register, component="test-shard")
    await service.set_serving(True)
    return service


def _answer() -> shard_pb2.ShardServiceSearchResponse:
    return shard_pb2.ShardServiceSearchResponse(
        hits=[common_pb2.Hit(image_id="i1", product_id="p1", category="a", score=0.5)], candidates_scanned=3)


async def test_a_shard_without_search_stream_is_searched_with_unary_calls():
    servicer = OldShard(_answer())
    service = await _serve(servicer)
    query = SearchQuery(vector=np.ones(DIM, np.float32), top_k=1)
    try:
        async with ShardClient(f"127.0.0.1:{service.port}") as client:
            result = await client.search(query, timeout_s=5)
            assert [h.image_id for h in result.hits] == ["i1"] and servicer.searches == 1
            assert not client._search_streams.usable()  # for a while: UNIMPLEMENTED_RETRY_S
            await client.search(query, timeout_s=5)  # no second try of the stream for a while
            assert servicer.searches == 2 and not client._search_streams.idle_streams
    finally:
        await service.stop(0)


async def test_a_shard_that_does_not_answer_in_time_fails_only_that_search():
    servicer = SlowStreamShard(_answer(), delay_s=3.0, slow=1)
    service = await _serve(servicer)
    query = SearchQuery(vector=np.ones(DIM, np.float32), top_k=1)
    try:
        async with ShardClient(f"127.0.0.1:{service.port}") as client:
            started = time.monotonic()
            with pytest.raises(DeadlineExceededError):
                await client.search(query, timeout_s=0.3)
            assert time.monotonic() - started < 1.5
            assert not client._search_streams.idle_streams  # its answer may still come: that stream is not used again
            # the next search gets a new stream, and not the late answer of the first
            assert [h.image_id for h in (await client.search(query, timeout_s=5)).hits] == ["i1"]
            assert servicer.searches == 0
    finally:
        await service.stop(0)


async def test_a_malformed_stream_message_is_invalid_argument(shard):
    _handle, client, _catalogue = shard
    async with grpc.aio.insecure_channel(client.address) as channel:
        call = channel.stream_stream("/imgsearch.v1.ShardService/SearchStream")()
        await call.write(b"\xff\xff\xff")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call.read()
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "malformed request message" in info.value.details()


# -- the real ShardServicer over a stand-in engine whose searches take `delay_s` (unit tests of shard_server.service)

class SlowEngine:
    """Stands in for ShardEngine: every search takes `delay_s` (in the search pool: EXACT searches go there)."""

    def __init__(self, delay_s: float):
        self.delay_s = delay_s
        self.loaded = True
        self.partitions = {}
        self.config = ShardConfig(data_dir="/nonexistent", dimension=DIM)

    def search(self, query, *, exact_rows_limit=None):
        time.sleep(self.delay_s)
        return SearchResult(hits=(Hit(image_id="i1", product_id="p1", category="a", score=0.5),))


@pytest.fixture
async def slow_shard():
    from concurrent.futures import ThreadPoolExecutor

    from shard_server.service import ShardServicer

    engine = SlowEngine(delay_s=1.0)
    pool = ThreadPoolExecutor(4)
    servicer = ShardServicer(engine, pool, pool)

    def register(server):
        shard_pb2_grpc.add_ShardServiceServicer_to_server(servicer, server)
        return [convert.SERVICE_NAME]

    service = await start_grpc_service(ServerOptions(host="127.0.0.1", port=0, shutdown_grace_s=20.0), register,
                                       component="slow-shard")
    service.request_streams.append(servicer.search_streams)
    await service.set_serving(True)
    yield engine, servicer, service
    await service.stop(0)
    pool.shutdown(wait=False)


SLOW_QUERY = SearchQuery(vector=np.ones(DIM, np.float32), top_k=1, exactness=Exactness.EXACT)


async def test_a_message_past_its_time_limit_is_deadline_exceeded_and_its_stream_is_kept(slow_shard):
    engine, _servicer, service = slow_shard
    late0, cancelled0 = _handled("SearchStream", "DEADLINE_EXCEEDED"), _handled("SearchStream", "CANCELLED")
    async with ShardClient(f"127.0.0.1:{service.port}") as client:
        started = time.monotonic()
        with pytest.raises(DeadlineExceededError):
            await client.search(SLOW_QUERY, timeout_s=0.3)
        assert time.monotonic() - started < 0.8
        # The shard answers DEADLINE_EXCEEDED at the message's own limit, counts it so (a cancel counted as
        # CANCELLED escaped the error-ratio alert), and the client takes the stream back once that answer is read.
        await settle(lambda: client._search_streams.idle_streams)
        assert client._search_streams.idle_streams == 1
        assert _handled("SearchStream", "DEADLINE_EXCEEDED") - late0 == 1
        assert _handled("SearchStream", "CANCELLED") - cancelled0 == 0
        engine.delay_s = 0.0
        assert [h.image_id for h in (await client.search(SLOW_QUERY, timeout_s=3)).hits] == ["i1"]


async def test_a_shutdown_answers_the_search_in_progress_first(slow_shard):
    _engine, _servicer, service = slow_shard
    async with ShardClient(f"127.0.0.1:{service.port}") as client:
        search = asyncio.create_task(client.search(SLOW_QUERY, timeout_s=5))
        await asyncio.sleep(0.3)  # the shard is searching
        started = time.monotonic()
        await service.stop()  # grace 20 s
        assert time.monotonic() - started < 3.0
        assert [h.image_id for h in (await search).hits] == ["i1"]


async def test_a_cancelled_search_leaves_no_stream_behind(slow_shard):
    _engine, servicer, service = slow_shard
    cancelled0 = _handled("SearchStream", "CANCELLED")
    async with ShardClient(f"127.0.0.1:{service.port}") as client:
        search = asyncio.create_task(client.search(SLOW_QUERY, timeout_s=5))
        await asyncio.sleep(0.3)
        search.cancel()
        with pytest.raises(asyncio.CancelledError):
            await search
        assert not client._search_streams.idle_streams
        # the shard's handler ends with the call (after the search's thread returns)
        await settle(lambda: not servicer.search_streams._open)
        assert not servicer.search_streams._open
        assert _handled("SearchStream", "CANCELLED") - cancelled0 == 1


async def test_a_shard_killed_and_restarted_on_its_port_is_searched_over_a_new_stream(tmp_path, free_port):
    from shard_server.process import ShardProcess

    port = free_port()
    shard = ShardProcess(tmp_path / "shard", extra_args=("--port", str(port), "--dimension", str(DIM))).start()
    try:
        async with ShardClient(shard.address) as client:
            catalogue = await _load(client)
            query = _queries(catalogue, 1)[0]
            before = await client.search(query, timeout_s=5)
            assert client._search_streams.idle_streams == 1
            shard.kill()  # SIGKILL: the stream breaks without a word
            shard.start()
            assert await client.search(query, timeout_s=10) == before
    finally:
        shard.stop()


async def test_a_client_hanging_up_while_answers_are_on_their_way_leaves_nothing_behind(tmp_path, caplog):
    # The handler's generators were left suspended at a yield; closing them later went through the error path
    # (GeneratorExit mapped to INTERNAL: "unhandled error in RPC handler"), and the stream stayed registered.
    import gc

    handle = await start_shard_server(_config(tmp_path, max_top_k=1000, max_batch_searches=256))
    try:
        async with ShardClient(f"127.0.0.1:{handle.port}") as client:
            catalogue = synthetic.SyntheticCatalogue(dim=DIM, clusters=4)
            await client.upsert(catalogue.records(0, 3000, category="a"), timeout_s=30)
            streams = handle.service.request_streams[0]
            # ~200 x 1000 hits: an answer of megabytes, held back by flow control while the client does not read
            request = convert.stream_request_to_proto([SearchQuery(vector=catalogue.queries(1)[0], top_k=1000)] * 200,
                                                      timeout_s=30)
            for _ in range(2):
                async with grpc.aio.insecure_channel(client.address,
                                                     options=[("grpc.max_receive_message_length", 1 << 28)]) as channel:
                    call = shard_pb2_grpc.ShardServiceStub(channel).SearchStream()
                    await call.write(request)
                    await asyncio.sleep(1.0)
                    call.cancel()
                    await asyncio.sleep(0.3)
                gc.collect()
                await asyncio.sleep(0.2)
            assert not streams._open
            assert "unhandled error" not in caplog.text and "never retrieved" not in caplog.text
            assert await client.search(_queries(catalogue, 1)[0], timeout_s=5)
    finally:
        await handle.stop(snapshot=False)


async def test_a_search_on_the_event_loop_that_ends_past_the_limit_is_answered_deadline_exceeded(slow_shard):
    # A search on the shard's event loop does not yield, so nothing cut it short: it was answered with results,
    # counted OK, after its client had given up (review of 2026-12-05).
    engine, _servicer, service = slow_shard
    engine.delay_s = 0.3
    late0 = _handled("SearchStream", "DEADLINE_EXCEEDED")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as channel:
        call = shard_pb2_grpc.ShardServiceStub(channel).SearchStream()
        inline = SearchQuery(vector=np.ones(DIM, np.float32), top_k=1)  # not EXACT: searched on the loop
        await call.write(convert.stream_request_to_proto([inline] * 2, timeout_s=0.1))
        response = await call.read()
        assert [o.error.code for o in response.outcomes] == [grpc.StatusCode.DEADLINE_EXCEEDED.value[0]] * 2
        assert _handled("SearchStream", "DEADLINE_EXCEEDED") - late0 == 1
        engine.delay_s = 0.0
        await call.write(convert.stream_request_to_proto([inline], timeout_s=1))
        assert (await call.read()).outcomes[0].WhichOneof("outcome") == "result"
        await call.done_writing()


@pytest.mark.parametrize("timeout_s", [-1.0, float("nan"), float("-inf")])
async def test_a_message_with_a_negative_or_nan_limit_is_deadline_exceeded_at_once(shard, timeout_s):
    # It meant no limit at all; a call with such a deadline fails at once. 0 (not set) means no limit.
    _handle, client, catalogue = shard
    query = _queries(catalogue, 1)[0]
    async with grpc.aio.insecure_channel(client.address) as channel:
        call = shard_pb2_grpc.ShardServiceStub(channel).SearchStream()
        await call.write(convert.stream_request_to_proto([query], timeout_s=timeout_s))
        assert (await call.read()).outcomes[0].error.code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
        await call.write(convert.stream_request_to_proto([query], timeout_s=0))
        assert (await call.read()).outcomes[0].WhichOneof("outcome") == "result"
        await call.done_writing()


class LateUnimplementedShard(OldShard):
    """A shard without SearchStream that is slow to say so, and slow to search."""

    async def SearchStream(self, request_iterator, context):
        await asyncio.sleep(self.delay_s)
        context.set_code(grpc.StatusCode.UNIMPLEMENTED)
        raise NotImplementedError


async def test_the_unary_call_after_a_stream_try_gets_only_the_time_left():
    servicer = LateUnimplementedShard(_answer(), delay_s=0.25)
    service = await _serve(servicer)
    try:
        async with ShardClient(f"127.0.0.1:{service.port}") as client:
            started = time.monotonic()
            with pytest.raises(DeadlineExceededError):
                await client.search(SearchQuery(vector=np.ones(DIM, np.float32), top_k=1), timeout_s=0.4)
            assert time.monotonic() - started < 0.48  # the unary call got 0.4 s again: answered at 0.5 s
    finally:
        await service.stop(0)


async def test_streams_over_the_servers_limit_are_refused_and_their_searches_go_unary(tmp_path):
    """Each open stream holds a handler and grpc's call state for as long as its client keeps it: a server holds
    at most max_search_streams per method, refuses more when they open (RESOURCE_EXHAUSTED, counted as one call),
    and ShardClient sends that search as a unary call instead."""
    handle = await start_shard_server(_config(tmp_path, max_search_streams=2))
    address = f"127.0.0.1:{handle.port}"
    try:
        async with ShardClient(address) as client:
            query = await _loaded_query(client)
            expected = await client.search(query, timeout_s=5)  # over one stream, kept idle by client
            async with grpc.aio.insecure_channel(address) as channel:
                stub = shard_pb2_grpc.ShardServiceStub(channel)
                message = convert.stream_request_to_proto([query], timeout_s=5)
                held = stub.SearchStream()  # the second and last stream the shard allows
                await held.write(message)
                assert (await held.read()).outcomes[0].HasField("result")
                refused0, unary0 = _handled("SearchStream", "RESOURCE_EXHAUSTED"), _handled("Search", "OK")
                over = stub.SearchStream()
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    # the refusal comes when the call arrives: before the write is done on a busy box (a clean-
                    # clone run of 2026-12-06), else at the read
                    await over.write(message)
                    await over.read()
                assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "max_search_streams" in refused.value.details()
                assert _handled("SearchStream", "RESOURCE_EXHAUSTED") - refused0 == 1
                # Two searches at once: one over the client's idle stream, one over a new stream, refused, then
                # sent as a unary call; both answered.
                assert list(await asyncio.gather(client.search(query, timeout_s=5),
                                                 client.search(query, timeout_s=5))) == [expected, expected]
                assert _handled("Search", "OK") - unary0 == 1
                held.cancel()
            (streams,) = handle.service.request_streams
            assert streams.max_open == 2
            await settle(lambda: streams.open_streams <= 1, timeout_s=5)
            assert streams.open_streams <= 1
    finally:
        await handle.stop(snapshot=False)


async def test_a_stream_left_idle_by_a_vanished_client_is_ended_and_its_slot_given_back(tmp_path, monkeypatch):
    """A client that vanished without closing its connection (power loss, a partition, a proxy holding the
    connection) left its idle streams open for grpc's 2-hour keepalive, each holding one of max_search_streams:
    once they were all held every new stream was refused (review of 2026-12-06). A stream idle for
    STREAM_IDLE_LIMIT_S is now ended with status OK, and the client's next search goes over a new stream."""
    from imgsearch import serving

    monkeypatch.setattr(serving, "STREAM_IDLE_LIMIT_S", 0.5)
    monkeypatch.setattr(serving, "STREAM_IDLE_SWEEP_S", 0.1)
    handle = await start_shard_server(_config(tmp_path, max_search_streams=2))
    address = f"127.0.0.1:{handle.port}"
    try:
        async with ShardClient(address) as client:
            query = await _loaded_query(client)
            expected = await client.search(query, timeout_s=5)
            async with grpc.aio.insecure_channel(address) as channel:
                vanished = shard_pb2_grpc.ShardServiceStub(channel).SearchStream()  # never written to again
                await vanished.write(convert.stream_request_to_proto([query], timeout_s=5))
                assert (await vanished.read()).outcomes[0].HasField("result")
                (streams,) = handle.service.request_streams
                assert streams.open_streams == 2
                await settle(lambda: streams.open_streams == 0, timeout_s=5)
                assert streams.open_streams == 0
                assert await vanished.read() is grpc.aio.EOF and await vanished.code() is grpc.StatusCode.OK
            ok0 = _handled("Search", "OK")
            assert await client.search(query, timeout_s=5) == expected  # over a new stream, not a unary call
            assert _handled("Search", "OK") == ok0 and streams.open_streams == 1
    finally:
        await handle.stop(snapshot=False)


async def test_a_stream_kept_busy_is_not_ended_as_idle(tmp_path, monkeypatch):
    from imgsearch import serving

    monkeypatch.setattr(serving, "STREAM_IDLE_LIMIT_S", 0.3)
    monkeypatch.setattr(serving, "STREAM_IDLE_SWEEP_S", 0.05)
    handle = await start_shard_server(_config(tmp_path))
    try:
        async with ShardClient(f"127.0.0.1:{handle.port}") as client:
            query = await _loaded_query(client)
            (streams,) = handle.service.request_streams
            await client.search(query, timeout_s=5)
            handlers = set(streams._open)  # the one stream's handler task
            loop = asyncio.get_running_loop()
            until = loop.time() + 1.5
            while loop.time() < until:  # one search every 0.1 s: never idle for 0.3 s
                await client.search(query, timeout_s=5)
                await asyncio.sleep(0.1)
            assert len(handlers) == 1 and set(streams._open) == handlers
    finally:
        await handle.stop(snapshot=False)
