"""Malformed requests of each kind get the right status code with a useful message, and the server stays up."""

import grpc
import numpy as np
import pytest

from imgsearch.errors import ImgsearchError
from imgsearch.v1 import common_pb2, shard_pb2, shard_pb2_grpc
from shard_server import synthetic
from shard_server.client import ShardClient
from shard_server.config import ShardConfig
from shard_server.server import start_shard_server
from shard_server.types import AnyOf, Condition, Equals, Filter, Range, Record, SearchQuery

DIM = 32
INVALID = grpc.StatusCode.INVALID_ARGUMENT
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED


@pytest.fixture(params=[True, False], ids=["inline", "search-pool"])
async def shard(tmp_path, request):
    # Both ways of running a search (on the event loop, in the search thread pool) map errors the same way.
    config = ShardConfig(data_dir=tmp_path / "shard", dimension=DIM, max_top_k=100, max_records_per_request=50,
                         max_stream_bytes=64 * 1024, max_message_bytes=256 * 1024, inline_search=request.param)
    handle = await start_shard_server(config)
    client = ShardClient(f"127.0.0.1:{handle.port}")
    catalogue = synthetic.SyntheticCatalogue(dim=DIM, clusters=4)
    await client.upsert(catalogue.records(0, 40), timeout_s=10)
    yield handle, client, catalogue
    await client.close()
    await handle.stop(snapshot=False)


def _vector(values) -> np.ndarray:
    return np.asarray(values, dtype=np.float32)


GOOD = np.ones(DIM, dtype=np.float32)
BAD_QUERIES = {
    "wrong dimension": (SearchQuery(vector=np.ones(DIM + 1, np.float32), top_k=5), "dimension 33, expected 32"),
    "NaN": (SearchQuery(vector=_vector([np.nan] + [1.0] * (DIM - 1)), top_k=5), "NaN or Inf"),
    "Inf": (SearchQuery(vector=_vector([np.inf] + [1.0] * (DIM - 1)), top_k=5), "NaN or Inf"),
    "zero vector": (SearchQuery(vector=np.zeros(DIM, np.float32), top_k=5), "zero"),
    "top_k 0": (SearchQuery(vector=GOOD, top_k=0), "top_k must be in 1..100"),
    "top_k too big": (SearchQuery(vector=GOOD, top_k=101), "top_k must be in 1..100"),
    "unknown field": (SearchQuery(vector=GOOD, top_k=5, filter=Filter(all_of=(
        Condition(field="size", predicate=Equals(value="XL")),))), "unknown filter field 'size'"),
    "wrong predicate type": (SearchQuery(vector=GOOD, top_k=5, filter=Filter(all_of=(
        Condition(field="brand", predicate=Range(min=1.0)),))), "field 'brand' is text"),
    "empty category": (SearchQuery(vector=GOOD, top_k=5, categories=("",)), "empty category"),
    # an empty range answered 0 hits, hiding swapped bounds (review of 2026-12-05)
    "empty range": (SearchQuery(vector=GOOD, top_k=5, filter=Filter(all_of=(
        Condition(field="price", predicate=Range(min=10.0, max=5.0)),))), "range on 'price' is empty: min 10"),
    "empty exclusive range": (SearchQuery(vector=GOOD, top_k=5, filter=Filter(all_of=(
        Condition(field="price", predicate=Range(min=5.0, max=5.0, exclusive=True)),))), "min = max 5, exclusive"),
    # Each condition costs a pass over the attribute columns; a 1M-value any_of held the loop for seconds.
    "too many conditions": (SearchQuery(vector=GOOD, top_k=5, filter=Filter(all_of=tuple(
        Condition(field="brand", predicate=Equals(value=f"b{i}")) for i in range(65)))), "the limit is 64"),
    "any_of too big": (SearchQuery(vector=GOOD, top_k=5, filter=Filter(all_of=(
        Condition(field="brand", predicate=AnyOf(values=frozenset(f"b{i}" for i in range(4097)))),))),
        "the limit is 4096"),
    # ... and over the whole filter: 64 conditions of 4,096 values each took a shard to 2.2 GB.
    "any_of values over all conditions": (SearchQuery(vector=GOOD, top_k=5, filter=Filter(all_of=tuple(
        Condition(field="brand", predicate=AnyOf(values=frozenset(f"b{c}-{i}" for i in range(2500))))
        for c in range(2)))), "over all its conditions"),
    "a filter value longer than any attribute": (SearchQuery(vector=GOOD, top_k=5, filter=Filter(all_of=(
        Condition(field="brand", predicate=Equals(value="b" * 1025)),))), "could never match"),
    "too much filter text": (SearchQuery(vector=GOOD, top_k=5, filter=Filter(all_of=(
        Condition(field="brand", predicate=AnyOf(values=frozenset(f"{i:04d}" + "b" * 996 for i in range(100)))),
    ))), "the limit is 65536"),
}


@pytest.mark.parametrize("case", sorted(BAD_QUERIES))
async def test_bad_search_is_invalid_argument(shard, case):
    _, client, _ = shard
    query, message = BAD_QUERIES[case]
    with pytest.raises(ImgsearchError) as info:
        await client.search(query, timeout_s=5)
    assert info.value.code == INVALID, info.value
    assert message in str(info.value)
    assert await client.health(timeout_s=5)
    assert len((await client.search(SearchQuery(vector=GOOD, top_k=5), timeout_s=5)).hits) == 5


def _record(**overrides) -> Record:
    values = {"image_id": "x", "product_id": "p", "category": "c", "vector": GOOD, "attributes": {"brand": "b"}}
    return Record(**{**values, **overrides})


BAD_RECORDS = {
    "empty image id": (_record(image_id=""), "empty image id"),
    "empty category": (_record(category=""), "empty category"),
    "wrong dimension": (_record(vector=np.ones(8, np.float32)), "dimension 8, expected 32"),
    "NaN": (_record(vector=_vector([np.nan] * DIM)), "NaN or Inf"),
    "zero vector": (_record(vector=np.zeros(DIM, np.float32)), "zero"),
    "unknown attribute": (_record(attributes={"size": "XL"}), "unknown attribute 'size'"),
    "wrong attribute type": (_record(attributes={"price": "cheap"}), "'price' must be a finite number"),
    "attribute text too long": (_record(attributes={"brand": "b" * 1025}), "the limit is 1024"),
    # the broker's limit: such an id could be written here directly, then neither deleted nor searched by id
    # through the broker (review of 2026-12-05)
    "image id too long": (_record(image_id="i" * 513), "image_id is over 512 characters"),
    "product id too long": (_record(product_id="p" * 513), "product_id is over 512 characters"),
    "category too long": (_record(category="c" * 513), "category is over 512 characters"),
}


@pytest.mark.parametrize("case", sorted(BAD_RECORDS))
async def test_bad_upsert_is_invalid_argument_and_writes_nothing(shard, case):
    _handle, client, _ = shard
    record, message = BAD_RECORDS[case]
    good = _record(image_id="good-one")
    for call in (client.upsert([good, record], timeout_s=5), client.upsert_stream([good, record], timeout_s=5)):
        with pytest.raises(ImgsearchError) as info:
            await call
        assert info.value.code == INVALID, info.value
        assert message in str(info.value)
    # The whole request was rejected: not even its valid record was written.
    assert sum(c.vectors for c in (await client.stats(timeout_s=5)).categories) == 40
    assert await client.health(timeout_s=5)


async def test_validate_only_refuses_what_a_write_would_and_writes_nothing(shard):
    """The broker asks every shard of a multi-shard ingest first (validate_only), then writes."""
    _handle, client, _ = shard
    good = _record(image_id="checked-only")
    assert await client.upsert([good], timeout_s=5, validate_only=True) == 0
    for record, message in BAD_RECORDS.values():
        with pytest.raises(ImgsearchError) as info:
            await client.upsert([good, record], timeout_s=5, validate_only=True)
        assert info.value.code == INVALID and message in str(info.value)
    with pytest.raises(ImgsearchError) as info:
        await client.upsert([_record(image_id=f"r{i}") for i in range(51)], timeout_s=5, validate_only=True)
    assert info.value.code == EXHAUSTED
    assert await client.get(["checked-only"], timeout_s=5) == []
    assert sum(c.vectors for c in (await client.stats(timeout_s=5)).categories) == 40


async def test_protocol_level_malformations(shard):
    handle, client, _ = shard
    async with grpc.aio.insecure_channel(f"127.0.0.1:{handle.port}") as channel:
        stub = shard_pb2_grpc.ShardServiceStub(channel)
        no_predicate = shard_pb2.ShardServiceSearchRequest(
            vector=common_pb2.Vector(values=GOOD), top_k=3,
            filter=common_pb2.Filter(all_of=[common_pb2.Condition(field="brand")]))
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Search(no_predicate, timeout=5)
        assert info.value.code() == INVALID and "has no predicate" in info.value.details()
        no_kind = shard_pb2.UpsertRequest(records=[shard_pb2.VectorRecord(
            image_id="a", category="c", vector=common_pb2.Vector(values=GOOD),
            attributes={"brand": common_pb2.AttributeValue()})])
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Upsert(no_kind, timeout=5)
        assert info.value.code() == INVALID and "no text, number or flag" in info.value.details()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Delete(shard_pb2.ShardServiceDeleteRequest(image_ids=["ok", ""]), timeout=5)
        assert info.value.code() == INVALID and "empty image id" in info.value.details()
        # Bytes that are no protobuf message at all: INVALID_ARGUMENT (grpc's own answer would be UNKNOWN),
        # for a unary call and inside an atomic upsert stream, which then writes nothing.
        garbage = b"\xff\xff\xff\xff not a protobuf message"
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await channel.unary_unary("/imgsearch.v1.ShardService/Search")(garbage, timeout=5)
        assert info.value.code() == INVALID and "malformed request message" in info.value.details()
        good = shard_pb2.UpsertStreamRequest(records=[shard_pb2.VectorRecord(
            image_id="streamed", category="c", vector=common_pb2.Vector(values=GOOD))]).SerializeToString()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await channel.stream_unary("/imgsearch.v1.ShardService/UpsertStream")(iter([good, garbage]), timeout=5)
        assert info.value.code() == INVALID and "malformed request message" in info.value.details()
    assert await client.health(timeout_s=5)
    assert sum(c.vectors for c in (await client.stats(timeout_s=5)).categories) == 40


async def test_vectors_of_extreme_magnitude_are_normalised(shard):
    # Finite and non-zero, but their squared norm overflows (1e30) or underflows (1e-30) float32.
    _, client, catalogue = shard
    target = catalogue.vectors(7, 8)[0]
    for scale in (1e30, 1e-30):
        hits = (await client.search(SearchQuery(vector=target * scale, top_k=1), timeout_s=5)).hits
        assert hits[0].image_id == synthetic.image_id(7) and hits[0].score == pytest.approx(1.0, abs=1e-5)


async def test_oversize_requests_are_resource_exhausted(shard):
    _, client, catalogue = shard
    with pytest.raises(ImgsearchError) as info:  # more records than max_records_per_request
        await client.upsert(catalogue.records(100, 151), timeout_s=5)
    assert info.value.code == EXHAUSTED and "limit is 50" in str(info.value)
    with pytest.raises(ImgsearchError) as info:  # more ids than max_records_per_request
        await client.delete([f"id-{i}" for i in range(51)], timeout_s=5)
    assert info.value.code == EXHAUSTED
    with pytest.raises(ImgsearchError) as info:  # stream over max_stream_bytes
        await client.upsert_stream(catalogue.iter_records(100, 1100), batch_size=40, timeout_s=10)
    assert info.value.code == EXHAUSTED and "upsert stream exceeds" in str(info.value)
    with pytest.raises(ImgsearchError) as info:  # one message over the gRPC message size limit
        await client.search(SearchQuery(vector=np.ones(100_000, np.float32), top_k=5), timeout_s=5)
    assert info.value.code == EXHAUSTED
    assert await client.health(timeout_s=5)
    assert sum(c.vectors for c in (await client.stats(timeout_s=5)).categories) == 40


async def test_not_serving_and_unavailable_until_loaded(tmp_path, monkeypatch):
    import threading

    from shard_server.engine import ShardEngine

    gate = threading.Event()
    original_load = ShardEngine.load

    def gated_load(self):  # stands in for a long snapshot load + log replay
        gate.wait(30)
        original_load(self)

    monkeypatch.setattr(ShardEngine, "load", gated_load)
    handle = await start_shard_server(ShardConfig(data_dir=tmp_path / "shard", dimension=DIM), wait_loaded=False)
    client = ShardClient(f"127.0.0.1:{handle.port}")
    try:
        assert not await client.health(timeout_s=5)
        with pytest.raises(ImgsearchError) as info:
            await client.search(SearchQuery(vector=GOOD, top_k=1), timeout_s=5)
        assert info.value.code == grpc.StatusCode.UNAVAILABLE and "loading" in str(info.value)
        gate.set()
        await handle.wait_loaded()
        assert await client.health(timeout_s=5)
        assert (await client.search(SearchQuery(vector=GOOD, top_k=1), timeout_s=5)).hits == ()
    finally:
        gate.set()
        await client.close()
        await handle.stop(snapshot=False)
