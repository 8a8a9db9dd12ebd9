"""SearchBatch on a real shard server, and the broker's coalescing of concurrent searches into batches
(broker.coalesce): against a real shard, batched answers equal one-at-a-time answers; with a stand-in client
(unit tests of the one module), deadlines, errors and the fallback for shards without SearchBatch."""

import asyncio

import grpc
import numpy as np
import pytest
from prometheus_client import REGISTRY

from broker.coalesce import SearchCoalescer
from imgsearch.errors import DeadlineExceededError, ImgsearchError, UnavailableError, from_status
from shard_server import synthetic
from shard_server.client import ShardClient
from shard_server.config import ShardConfig
from shard_server.server import start_shard_server
from shard_server.types import Condition, Equals, Filter, Hit, Is, Range, SearchQuery, SearchResult

DIM = 32
GOOD = np.ones(DIM, dtype=np.float32)


@pytest.fixture(params=[True, False], ids=["inline", "search-pool"])
async def shard(tmp_path, request):
    config = ShardConfig(data_dir=tmp_path / "shard", dimension=DIM, max_top_k=100, max_batch_searches=8,
                         inline_search=request.param)
    handle = await start_shard_server(config)
    client = ShardClient(f"127.0.0.1:{handle.port}")
    catalogue = synthetic.SyntheticCatalogue(dim=DIM, clusters=4)
    for i, category in enumerate("abc"):
        await client.upsert(catalogue.records(100 * i, 100 * (i + 1), category=category), timeout_s=10)
    yield client, catalogue
    await client.close()
    await handle.stop(snapshot=False)


def _queries(catalogue, n: int) -> list[SearchQuery]:
    vectors = catalogue.queries(n)
    filters = (Filter(), Filter(all_of=(Condition(field="price", predicate=Range(max=50.0)),)),
               Filter(all_of=(Condition(field="in_stock", predicate=Is(value=True)),)))
    return [
        SearchQuery(vector=vectors[i], top_k=1 + i % 7, categories=(("a",), (), ("b", "c"))[i % 3],
                    filter=filters[i % 3], distinct_products=i % 4 == 0)
        for i in range(n)
    ]


async def test_batch_answers_equal_single_searches(shard):
    client, catalogue = shard
    queries = _queries(catalogue, 8)
    singles = [await client.search(q, timeout_s=5) for q in queries]
    batched = await client.search_batch(queries, timeout_s=5)
    assert batched == singles
    assert all(r.hits for r in singles)
    assert await client.search_batch([], timeout_s=5) == []


async def test_a_refused_search_fails_alone(shard):
    client, catalogue = shard
    good = _queries(catalogue, 3)
    bad = [
        SearchQuery(vector=np.ones(DIM + 1, np.float32), top_k=5),
        SearchQuery(vector=GOOD, top_k=101),
        SearchQuery(vector=GOOD, top_k=5, filter=Filter(all_of=(Condition(field="size", predicate=Equals(value="XL")),))),
    ]
    outcomes = await client.search_batch([good[0], bad[0], good[1], bad[1], bad[2], good[2]], timeout_s=5)
    for outcome, message in zip([outcomes[1], outcomes[3], outcomes[4]],
                                ["dimension 33, expected 32", "top_k must be in 1..100", "unknown filter field"]):
        assert isinstance(outcome, ImgsearchError) and outcome.code == grpc.StatusCode.INVALID_ARGUMENT
        assert message in str(outcome)
    assert [outcomes[0], outcomes[2], outcomes[5]] == [await client.search(q, timeout_s=5) for q in good]


async def test_a_batch_over_the_limit_is_resource_exhausted(shard):
    client, catalogue = shard
    with pytest.raises(ImgsearchError) as info:
        await client.search_batch(_queries(catalogue, 9), timeout_s=5)
    assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "the limit is 8" in str(info.value)
    assert len(await client.search_batch(_queries(catalogue, 8), timeout_s=5)) == 8


def _call_searches() -> tuple[float, float]:
    """(calls, searches) recorded so far by imgsearch_broker_shard_call_searches."""
    name = "imgsearch_broker_shard_call_searches"
    return REGISTRY.get_sample_value(f"{name}_count") or 0.0, REGISTRY.get_sample_value(f"{name}_sum") or 0.0


async def test_concurrent_searches_are_coalesced_and_answered_like_single_ones(shard):
    client, catalogue = shard
    queries = _queries(catalogue, 40)
    expected = [await client.search(q, timeout_s=5) for q in queries]
    coalescer = SearchCoalescer(client, max_in_flight=1, max_batch=8)
    calls0, searches0 = _call_searches()
    answers = await asyncio.gather(*(coalescer.search(q, timeout_s=5) for q in queries))
    calls, searches = _call_searches()
    assert list(answers) == expected
    assert searches - searches0 == 40
    assert calls - calls0 < 40 / 2, "concurrent searches should have shared calls"
    # one at a time: each search is its own call
    calls0, _ = _call_searches()
    for q in queries[:5]:
        await coalescer.search(q, timeout_s=5)
    assert _call_searches()[0] - calls0 == 5


async def test_a_refused_search_in_a_coalesced_batch_reaches_only_its_caller(shard):
    client, catalogue = shard
    queries = _queries(catalogue, 6)
    bad = SearchQuery(vector=GOOD, top_k=5, filter=Filter(all_of=(Condition(field="size", predicate=Equals(value="XL")),)))
    coalescer = SearchCoalescer(client, max_in_flight=1)
    outcomes = await asyncio.gather(*(coalescer.search(q, timeout_s=5) for q in [*queries[:3], bad, *queries[3:]]),
                                    return_exceptions=True)
    assert isinstance(outcomes[3], ImgsearchError) and outcomes[3].code == grpc.StatusCode.INVALID_ARGUMENT
    assert [o for i, o in enumerate(outcomes) if i != 3] == [await client.search(q, timeout_s=5) for q in queries]


# -- unit tests of broker.coalesce with a stand-in client --

def _result(tag: str) -> SearchResult:
    return SearchResult(hits=(Hit(image_id=tag, product_id=tag, category="c", score=1.0),))


def _query(tag: int) -> SearchQuery:
    return SearchQuery(vector=np.full(4, tag + 1, np.float32), top_k=1)


class GatedClient:
    """Answers each search with its query's tag; calls wait until `release` is set."""

    def __init__(self, *, batch_error: ImgsearchError | None = None, refuse: set[int] = frozenset()):
        self.release = asyncio.Event()
        self.calls: list[int] = []  # searches per call, in order
        self.batch_error = batch_error
        self.refuse = refuse

    def _answer(self, query: SearchQuery):
        tag = int(query.vector[0]) - 1
        if tag in self.refuse:
            return from_status(grpc.StatusCode.INVALID_ARGUMENT, f"query {tag} refused")
        return _result(str(tag))

    async def search(self, query, *, timeout_s):
        self.calls.append(1)
        await asyncio.wait_for(self.release.wait(), timeout_s)
        outcome = self._answer(query)
        if isinstance(outcome, ImgsearchError):
            raise outcome
        return outcome

    async def search_batch(self, queries, *, timeout_s):
        self.calls.append(len(queries))
        if self.batch_error is not None:
            raise self.batch_error
        await asyncio.wait_for(self.release.wait(), timeout_s)
        return [self._answer(q) for q in queries]


async def test_searches_queue_behind_the_call_in_flight_and_leave_as_one_batch():
    client = GatedClient()
    coalescer = SearchCoalescer(client, max_in_flight=1, max_batch=3)
    tasks = [asyncio.ensure_future(coalescer.search(_query(i), timeout_s=5)) for i in range(6)]
    await asyncio.sleep(0.01)
    assert client.calls == [1]  # the first went out alone; five wait for it
    client.release.set()
    answers = await asyncio.gather(*tasks)
    assert [a.hits[0].image_id for a in answers] == [str(i) for i in range(6)]
    assert client.calls == [1, 3, 2]


async def test_a_queued_search_keeps_its_own_deadline():
    client = GatedClient()
    coalescer = SearchCoalescer(client, max_in_flight=1)
    first = asyncio.ensure_future(coalescer.search(_query(0), timeout_s=5))
    await asyncio.sleep(0)
    with pytest.raises(DeadlineExceededError):
        await coalescer.search(_query(1), timeout_s=0.05)
    patient = asyncio.ensure_future(coalescer.search(_query(2), timeout_s=5))
    await asyncio.sleep(0.01)
    client.release.set()
    assert (await first).hits[0].image_id == "0"
    assert (await patient).hits[0].image_id == "2"
    assert client.calls == [1, 1]  # the expired search was never sent


async def test_a_failed_batch_fails_each_of_its_searches_with_the_calls_status():
    client = GatedClient(batch_error=UnavailableError("shard down"))
    coalescer = SearchCoalescer(client, max_in_flight=1)
    first = asyncio.ensure_future(coalescer.search(_query(0), timeout_s=5))
    queued = [asyncio.ensure_future(coalescer.search(_query(i), timeout_s=5)) for i in (1, 2)]
    await asyncio.sleep(0)
    client.release.set()
    assert (await first).hits[0].image_id == "0"
    for task in queued:
        with pytest.raises(UnavailableError, match="shard down"):
            await task


async def test_per_search_errors_of_a_batch_reach_their_callers():
    client = GatedClient(refuse={2})
    coalescer = SearchCoalescer(client, max_in_flight=1)
    tasks = [asyncio.ensure_future(coalescer.search(_query(i), timeout_s=5)) for i in range(4)]
    await asyncio.sleep(0)
    client.release.set()
    outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    assert isinstance(outcomes[2], ImgsearchError) and outcomes[2].code == grpc.StatusCode.INVALID_ARGUMENT
    assert [o.hits[0].image_id for i, o in enumerate(outcomes) if i != 2] == ["0", "1", "3"]


async def test_a_shard_without_search_batch_gets_single_searches():
    client = GatedClient(batch_error=from_status(grpc.StatusCode.UNIMPLEMENTED, "Method not found!"))
    coalescer = SearchCoalescer(client, max_in_flight=1)
    first = asyncio.ensure_future(coalescer.search(_query(0), timeout_s=5))
    queued = [asyncio.ensure_future(coalescer.search(_query(i), timeout_s=5)) for i in (1, 2)]
    await asyncio.sleep(0)
    client.release.set()
    answers = await asyncio.gather(first, *queued)
    assert [a.hits[0].image_id for a in answers] == ["0", "1", "2"]
    assert client.calls == [1, 2, 1, 1]  # one refused batch, then each search on its own
    client.calls.clear()
    await asyncio.gather(*(coalescer.search(_query(i), timeout_s=5) for i in range(3)))
    assert client.calls == [1, 1, 1]  # no further batches to that replica


class SlowRefusingClient(GatedClient):
    """SearchBatch is refused (UNIMPLEMENTED) after 50 ms; a search takes as long as its tag says (ms)."""

    async def search_batch(self, queries, *, timeout_s):
        self.calls.append(len(queries))
        await asyncio.sleep(0.05)
        raise from_status(grpc.StatusCode.UNIMPLEMENTED, "Method not found!")

    async def search(self, query, *, timeout_s):
        self.calls.append(1)
        await asyncio.sleep(int(query.vector[0]) / 1000)
        return self._answer(query)


async def test_searches_queued_when_batches_turn_out_unsupported_leave_at_once_under_load():
    """A search queued while the SearchBatch call that the shard refused was in flight waited for a free call
    slot, which never came while later searches (each its own call by then) kept one in flight: it failed at its
    deadline although the shard answered every search around it."""
    coalescer = SearchCoalescer(SlowRefusingClient(), max_in_flight=1)
    first = asyncio.ensure_future(coalescer.search(_query(99), timeout_s=5))  # 100 ms in flight
    await asyncio.sleep(0.01)
    batch = [asyncio.ensure_future(coalescer.search(_query(i), timeout_s=5)) for i in (49, 50)]  # they queue
    await asyncio.sleep(0.11)  # the first answered; the batch call is in flight (refused at 50 ms)
    stranded = asyncio.ensure_future(coalescer.search(_query(1), timeout_s=0.5))
    await asyncio.sleep(0.07)  # refused; its searches go one by one (50 ms each)
    long_call = asyncio.ensure_future(coalescer.search(_query(999), timeout_s=5))  # 1 s, its own call at once
    answers = await asyncio.gather(first, *batch, stranded, long_call)
    assert [a.hits[0].image_id for a in answers] == ["99", "49", "50", "1", "999"]


async def test_a_replica_without_search_batch_is_offered_batches_again_later(monkeypatch):
    client = GatedClient(batch_error=from_status(grpc.StatusCode.UNIMPLEMENTED, "Method not found!"))
    coalescer = SearchCoalescer(client, max_in_flight=1)
    monkeypatch.setattr("broker.coalesce.BATCHES_RETRY_S", 0.05)
    client.release.set()
    await asyncio.gather(*(coalescer.search(_query(i), timeout_s=5) for i in range(3)))
    assert not coalescer._batches_supported
    await asyncio.sleep(0.1)
    assert coalescer._batches_supported  # the shard may have been upgraded meanwhile


async def test_a_batch_over_the_shards_limit_is_sent_as_single_searches(shard):
    client, catalogue = shard  # this shard takes at most 8 searches per batch
    queries = _queries(catalogue, 13)
    coalescer = SearchCoalescer(client, max_in_flight=1, max_batch=12)
    answers = await asyncio.gather(*(coalescer.search(q, timeout_s=5) for q in queries))
    assert list(answers) == [await client.search(q, timeout_s=5) for q in queries]
    assert coalescer._batches_supported  # a refused size is not a missing method


async def test_no_queueing_with_unlimited_calls_in_flight():
    client = GatedClient()
    coalescer = SearchCoalescer(client, max_in_flight=1_000)
    tasks = [asyncio.ensure_future(coalescer.search(_query(i), timeout_s=5)) for i in range(5)]
    await asyncio.sleep(0)
    client.release.set()
    await asyncio.gather(*tasks)
    assert client.calls == [1] * 5


async def test_a_batch_of_heavy_searches_gives_other_calls_a_turn(tmp_path):
    """Searches on the shard's event loop do not yield: a batch of 256 top_k-1,000 distinct-product searches held
    the loop 2.6-3 s, and every other call waited that long (review of 2026-12-06). Once a batch has held the loop
    5 ms its other searches go to the search pool: another client's search waits about one heavy search. (The
    batch's answer is read as bytes: parsing 256,000 hits in this process would hold its loop, the shard's too.)"""
    import time
    from dataclasses import replace

    from shard_server import convert

    config = ShardConfig(data_dir=tmp_path / "shard", dimension=DIM, max_top_k=1001, max_batch_searches=256)
    handle = await start_shard_server(config)
    address = f"127.0.0.1:{handle.port}"
    try:
        async with ShardClient(address) as client, grpc.aio.insecure_channel(
                address, options=[("grpc.max_receive_message_length", 64 << 20)]) as channel:
            catalogue = synthetic.SyntheticCatalogue(dim=DIM, clusters=4)
            records = catalogue.records(0, 6000, category="one")
            await client.upsert([replace(r, product_id=f"p{i % 1500}") for i, r in enumerate(records)], timeout_s=30)
            heavy = SearchQuery(vector=catalogue.queries(1)[0], top_k=1000, categories=("one",),
                                distinct_products=True)
            light = SearchQuery(vector=catalogue.queries(1)[0], top_k=5, categories=("one",))
            started = time.perf_counter()
            await client.search(heavy, timeout_s=30)
            one_heavy_s = time.perf_counter() - started
            raw_batch = channel.unary_unary("/imgsearch.v1.ShardService/SearchBatch",
                                            request_serializer=lambda m: m.SerializeToString(),
                                            response_deserializer=lambda data: data)
            await client.search(light, timeout_s=30)  # its stream is open
            batch_started = time.perf_counter()
            batch = asyncio.ensure_future(raw_batch(convert.batch_to_proto([heavy] * 256), timeout=120))
            started = time.perf_counter()
            await asyncio.sleep(0.05)  # the batch is being answered (the shard runs on this process's loop)
            first_turn_s = time.perf_counter() - started
            waits = []
            while not batch.done():
                started = time.perf_counter()
                await client.search(light, timeout_s=30)
                waits.append(time.perf_counter() - started)
            await batch
            batch_s = time.perf_counter() - batch_started
    finally:
        await handle.stop(snapshot=False)
    assert batch_s > 1.0, batch_s
    assert first_turn_s < 0.25, (first_turn_s, batch_s)  # the loop the shard shares with this test was free
    assert max(waits) < max(0.25, 10 * one_heavy_s), (sorted(waits)[-5:], one_heavy_s, batch_s)
    assert len(waits) >= 10, (batch_s, len(waits))


@pytest.mark.parametrize(("categories", "says"), [
    (tuple(f"c{i}" for i in range(1025)), "names 1025 categories; the limit is 1024"),
    (("x" * 513,), "a category name of 513 characters"),
])
async def test_a_search_naming_too_many_or_too_long_categories_is_refused_by_shard_and_broker(
        tmp_path, categories, says):
    """A search of a million unknown category names (10 MB) held the broker's event loop 1.2-2.9 s, and a shard's
    for 2.7 s at three million, other clients' searches with them (review of 2026-12-06)."""
    from broker.client import BrokerClient
    from broker.config import BrokerConfig
    from broker.routing import ShardMap
    from broker.server import start_broker
    from imgsearch.errors import InvalidArgumentError
    from imgsearch.ports import free_port
    from imgsearch.serving import ServerOptions

    shard = await start_shard_server(ShardConfig(data_dir=tmp_path / "shard", dimension=DIM))
    broker = await start_broker(BrokerConfig(
        server=ServerOptions(host="127.0.0.1", port=0),
        shard_map=ShardMap(shards={"s0": (f"127.0.0.1:{shard.port}",)}), triton_url=f"127.0.0.1:{free_port()}",
        dimension=DIM))
    try:
        async with ShardClient(f"127.0.0.1:{shard.port}") as client:
            with pytest.raises(InvalidArgumentError, match=says):
                await client.search(SearchQuery(vector=GOOD, top_k=5, categories=categories), timeout_s=5)
            at_the_limits = tuple(f"c{i}" for i in range(1023)) + ("x" * 512,)
            assert (await client.search(SearchQuery(vector=GOOD, top_k=5, categories=at_the_limits),
                                        timeout_s=5)).hits == ()
        async with BrokerClient(f"127.0.0.1:{broker.port}", timeout_s=5) as client:
            with pytest.raises(InvalidArgumentError, match=says):
                await client.search(vector=GOOD, top_k=5, categories=categories)
    finally:
        await broker.stop()
        await shard.stop(snapshot=False)
