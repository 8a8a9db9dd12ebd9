"""Protobuf <-> broker data types (the filter, attribute and hit converters are the shard tier's)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from broker.errors import InvalidRequestError
from broker.types import (
    CacheOutcome,
    CatalogueItem,
    IngestSummary,
    Query,
    SearchAnswer,
    ShardReport,
    ShardSummary,
    StageTimings,
)
from imgsearch.errors import InvalidArgumentError
from imgsearch.v1 import broker_pb2, common_pb2
from shard_server.attributes import check_search_categories
from shard_server.convert import (
    add_hits,
    attributes_from_proto,
    attributes_to_proto,
    category_stats_from_proto,
    category_stats_to_proto,
    filter_from_proto,
    filter_to_proto,
    float32_array,
    hit_from_proto,
    vector_from_proto,
    vector_to_proto,
)
from shard_server.types import Exactness, Filter

_EXACTNESS_FROM_PROTO = {
    common_pb2.EXACTNESS_UNSPECIFIED: Exactness.DEFAULT,
    common_pb2.EXACTNESS_FAST: Exactness.FAST,
    common_pb2.EXACTNESS_HIGH: Exactness.HIGH,
    common_pb2.EXACTNESS_EXACT: Exactness.EXACT,
}
_EXACTNESS_TO_PROTO = {v: k for k, v in _EXACTNESS_FROM_PROTO.items()}
_CACHE_TO_PROTO = {
    CacheOutcome.NOT_USED: broker_pb2.CACHE_OUTCOME_NOT_USED,
    CacheOutcome.MISS: broker_pb2.CACHE_OUTCOME_MISS,
    CacheOutcome.EXACT: broker_pb2.CACHE_OUTCOME_EXACT,
    CacheOutcome.NEAR: broker_pb2.CACHE_OUTCOME_NEAR,
    CacheOutcome.ERROR: broker_pb2.CACHE_OUTCOME_ERROR,
}
_CACHE_FROM_PROTO = {v: k for k, v in _CACHE_TO_PROTO.items()}
_SHARD_OUTCOME_TO_PROTO = {
    "ok": broker_pb2.SHARD_OUTCOME_OK,
    "timeout": broker_pb2.SHARD_OUTCOME_TIMEOUT,
    "unavailable": broker_pb2.SHARD_OUTCOME_UNAVAILABLE,
    "error": broker_pb2.SHARD_OUTCOME_ERROR,
}
_SHARD_OUTCOME_FROM_PROTO = {v: k for k, v in _SHARD_OUTCOME_TO_PROTO.items()}


# ---------------------------------------------------------------- search
def query_from_proto(req: broker_pb2.SearchRequest) -> Query:
    which = req.WhichOneof("query")
    if which is None:
        raise InvalidRequestError("a search needs an image, a vector or an image id")
    if req.options.exactness not in _EXACTNESS_FROM_PROTO:
        raise InvalidRequestError(f"unknown exactness {req.options.exactness}")
    check_search_categories(req.categories)
    return Query(
        image=req.image if which == "image" else None,
        vector=vector_from_proto(req.vector) if which == "vector" else None,
        image_id=req.image_id if which == "image_id" else None,
        top_k=req.top_k,
        categories=tuple(req.categories),
        filter=filter_from_proto(req.filter) if req.HasField("filter") else Filter(),
        nprobe=req.options.nprobe,
        exactness=_EXACTNESS_FROM_PROTO[req.options.exactness],
        use_duplicate_cache=not req.skip_duplicate_cache,
        distinct_products=req.options.distinct_products,
    )


def query_to_proto(q: Query) -> broker_pb2.SearchRequest:
    req = broker_pb2.SearchRequest(
        top_k=q.top_k,
        categories=list(q.categories),
        skip_duplicate_cache=not q.use_duplicate_cache,
        options=common_pb2.SearchOptions(
            nprobe=q.nprobe, exactness=_EXACTNESS_TO_PROTO[q.exactness], distinct_products=q.distinct_products
        ),
    )
    if q.image is not None:
        req.image = q.image
    elif q.vector is not None:
        req.vector.CopyFrom(vector_to_proto(q.vector))
    elif q.image_id is not None:
        req.image_id = q.image_id
    if q.filter:
        req.filter.CopyFrom(filter_to_proto(q.filter))
    return req


def answer_to_proto(a: SearchAnswer, response: broker_pb2.SearchResponse | None = None) -> broker_pb2.SearchResponse:
    """The answer as a SearchResponse; filled into `response` when given (a SearchStreamResponse's `result`,
    instead of building one and copying it there)."""
    t = a.timings
    if response is None:
        response = broker_pb2.SearchResponse()
    response.cache = _CACHE_TO_PROTO[a.cache]
    response.from_duplicate_cache = a.from_duplicate_cache
    response.partial = a.partial
    for s in a.shards:
        response.shards.add(shard=s.shard, address=s.address, outcome=_SHARD_OUTCOME_TO_PROTO[s.outcome],
                            message=s.message)
    timings = response.timings
    timings.decode_hash_seconds = t.decode_hash_s
    timings.cache_seconds = t.cache_s
    timings.embed_seconds = t.embed_s
    timings.fanout_seconds = t.fanout_s
    timings.merge_seconds = t.merge_s
    timings.total_seconds = t.total_s
    add_hits(response.hits, a.hits)
    return response


def answer_from_proto(r: broker_pb2.SearchResponse) -> SearchAnswer:
    t = r.timings
    return SearchAnswer(
        hits=tuple([hit_from_proto(h) for h in r.hits]),
        cache=_CACHE_FROM_PROTO.get(r.cache, CacheOutcome.NOT_USED),
        from_duplicate_cache=r.from_duplicate_cache,
        partial=r.partial,
        shards=tuple(
            ShardReport(
                shard=s.shard,
                address=s.address,
                outcome=_SHARD_OUTCOME_FROM_PROTO.get(s.outcome, "error"),
                message=s.message,
            )
            for s in r.shards
        ),
        timings=StageTimings(
            decode_hash_s=t.decode_hash_seconds,
            cache_s=t.cache_seconds,
            embed_s=t.embed_seconds,
            fanout_s=t.fanout_seconds,
            merge_s=t.merge_seconds,
            total_s=t.total_seconds,
        ),
    )


# ---------------------------------------------------------------- ingest
def item_from_proto(msg: broker_pb2.CatalogueItem) -> CatalogueItem:
    which = msg.WhichOneof("content")
    return CatalogueItem(
        image_id=msg.image_id,
        product_id=msg.product_id,
        category=msg.category,
        image=msg.image if which == "image" else None,
        vector=vector_from_proto(msg.vector) if which == "vector" else None,
        attributes=attributes_from_proto(msg.attributes),
    )


def item_to_proto(item: CatalogueItem) -> broker_pb2.CatalogueItem:
    msg = broker_pb2.CatalogueItem(image_id=item.image_id, product_id=item.product_id, category=item.category)
    if item.image is not None:
        msg.image = item.image
    elif item.vector is not None:
        msg.vector.CopyFrom(vector_to_proto(item.vector))
    for key, value in attributes_to_proto(item.attributes).items():
        msg.attributes[key].CopyFrom(value)
    return msg


def checked_item_to_proto(item) -> broker_pb2.CatalogueItem:
    """`item_to_proto` for a client's item, InvalidArgumentError naming what is wrong (a dict, a path as the
    image, an id that is no string raised AttributeError or TypeError from inside the client), and a vector of
    more than one dimension refused as search refuses it (a (2, 256) array was stored as one 512-d vector; API
    review of 2026-12-06). Bytes-like images are taken, as search takes them."""
    if not isinstance(item, CatalogueItem):
        raise InvalidArgumentError(f"an item must be a CatalogueItem, got {type(item).__name__}")
    for name in ("image_id", "product_id", "category"):
        if not isinstance(getattr(item, name), str):
            raise InvalidArgumentError(f"item {name} must be a string, got {type(getattr(item, name)).__name__}")
    image, vector = item.image, item.vector
    if image is not None:
        if not isinstance(image, (bytes, bytearray, memoryview)):
            raise InvalidArgumentError(f"item {item.image_id[:64]!r}: image must be the encoded file's bytes, got "
                                       f"{type(image).__name__} (read the file first)")
        image = bytes(image)
    elif vector is not None:
        vector = float32_array(vector)
        if vector.ndim == 2 and vector.shape[0] == 1:
            vector = vector[0]
        if vector.ndim != 1:
            raise InvalidArgumentError(f"item {item.image_id[:64]!r}: vector must be one-dimensional, got shape "
                                       f"{vector.shape}")
    if not isinstance(item.attributes, Mapping) or not all(isinstance(k, str) for k in item.attributes):
        raise InvalidArgumentError(f"item {item.image_id[:64]!r}: attributes must be a mapping of names (strings) "
                                   "to values")
    try:
        return item_to_proto(dataclasses.replace(item, image=image, vector=vector))
    except (TypeError, ValueError, AttributeError) as exc:  # protobuf's own refusals of a value
        raise InvalidArgumentError(f"item {item.image_id[:64]!r}: {exc}") from None


def summary_to_proto(s: IngestSummary) -> broker_pb2.IngestResponse:
    return broker_pb2.IngestResponse(ingested=s.ingested, cache_pending=s.cache_pending)


# ---------------------------------------------------------------- stats
def stats_to_proto(shards: list[ShardSummary]) -> broker_pb2.BrokerServiceStatsResponse:
    return broker_pb2.BrokerServiceStatsResponse(
        shards=[
            broker_pb2.ShardStats(
                shard=s.shard,
                address=s.address,
                reachable=s.reachable,
                categories=[category_stats_to_proto(c) for c in s.categories],
            )
            for s in shards
        ]
    )


def stats_from_proto(r: broker_pb2.BrokerServiceStatsResponse) -> list[ShardSummary]:
    return [
        ShardSummary(
            shard=s.shard,
            address=s.address,
            reachable=s.reachable,
            categories=tuple(category_stats_from_proto(c) for c in s.categories),
        )
        for s in r.shards
    ]
