"""Protobuf <-> dataclass conversion for the shard tier. Protobuf stays at the boundary: everything inside the
shard (and the broker) works on :mod:`shard_server.types`. Conversions are structural only; value checks
(dimension, finiteness, schema) are the engine's job so that in-process and gRPC callers get the same errors."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence

import numpy as np

from imgsearch.errors import ImgsearchError, from_status, quoted
from imgsearch.v1 import common_pb2, shard_pb2
from shard_server.attributes import check_filter_size, check_filter_text, check_search_categories
from shard_server.errors import InvalidRequestError
from shard_server.types import (
    AnyOf,
    Attributes,
    CategoryStats,
    Condition,
    Equals,
    Exactness,
    Filter,
    Hit,
    Is,
    Range,
    Record,
    SearchQuery,
    SearchResult,
    ShardStats,
)

# The gRPC service name (health checks name it).
SERVICE_NAME = shard_pb2.DESCRIPTOR.services_by_name["ShardService"].full_name

_EXACTNESS_TO_PROTO = {
    Exactness.DEFAULT: common_pb2.EXACTNESS_UNSPECIFIED,
    Exactness.FAST: common_pb2.EXACTNESS_FAST,
    Exactness.HIGH: common_pb2.EXACTNESS_HIGH,
    Exactness.EXACT: common_pb2.EXACTNESS_EXACT,
}
_EXACTNESS_FROM_PROTO = {v: k for k, v in _EXACTNESS_TO_PROTO.items()}


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


_PACKED_VALUES_TAG = 0x0A  # field 1 (values), wire type 2 (length-delimited, packed floats)


def read_varint(buf: bytes | memoryview, pos: int) -> tuple[int, int]:
    """The protobuf base-128 varint at ``buf[pos]``: (its value, the position after it)."""
    value = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ValueError("truncated or overlong varint")
        byte = buf[pos]
        value |= (byte & 0x7F) << shift
        pos += 1
        if byte < 0x80:
            return value, pos
        shift += 7


_RECORDS_TAG = 0x0A  # UpsertRequest.records: field 1, length-delimited


def upsert_request_batches(chunks: Iterable[bytes | memoryview], *, batch_bytes: int) -> Iterator[memoryview]:
    """Serialised UpsertRequests of about ``batch_bytes`` each (a single larger record stays whole), cut at record
    boundaries, from ``chunks`` whose concatenation is one UpsertRequest, cut anywhere: an UpsertStream's messages
    (whole records, often small: joined) or a log frame read from its file a few megabytes at a time (a record
    cut by a chunk boundary is carried into the next batch). A chunk of at least ``batch_bytes`` that starts on a
    record boundary is sliced without a copy.

    A bulk write is logged as one frame of up to ``max_stream_bytes``: parsed whole, its records as Python objects
    take several times the frame's size (replaying a 420 MB frame peaked at 3.2 GB). Raises ValueError on
    anything but whole ``records`` fields, or if the last chunk ends inside a record.
    """
    pending: list[bytes | memoryview] = []
    pending_bytes = 0
    for chunk in chunks:
        pending.append(chunk)
        pending_bytes += len(chunk)
        if pending_bytes < batch_bytes:
            continue
        view = memoryview(pending[0] if len(pending) == 1 else b"".join(pending))
        pieces, end = _whole_records(view, max_bytes=batch_bytes, final=False)
        if pieces and end - len(pieces[-1]) > 0:  # the last piece is a short remainder: joined to what follows
            end -= len(pieces.pop())
        yield from pieces
        pending = [view[end:]] if end < len(view) else []
        pending_bytes = len(view) - end
    if pending:
        view = memoryview(pending[0] if len(pending) == 1 else b"".join(pending))
        yield from _whole_records(view, max_bytes=batch_bytes, final=True)[0]


_MAX_RECORD_HEADER_BYTES = 20  # a field tag and a length, each a varint of at most 10 bytes


def _whole_records(view: memoryview, *, max_bytes: int, final: bool) -> tuple[list[memoryview], int]:
    """Slices of ``view`` of at most ``max_bytes`` cut at record boundaries, and where the last whole record ends.
    A record cut off by the end of ``view`` is left out, or is an error when ``final``."""
    size = len(view)
    pieces: list[memoryview] = []
    start = pos = 0
    while pos < size:
        try:
            tag, body = read_varint(view, pos)
            wire_type = tag & 7
            if tag >> 3 == _RECORDS_TAG >> 3 and wire_type != 2:
                raise ValueError(f"field tag {tag} at byte {pos} is not UpsertRequest.records")
            if wire_type == 2:
                length, body = read_varint(view, body)
                end = body + length
            elif wire_type == 0:  # an unknown varint field (a newer client's): skipped like protobuf does
                _, end = read_varint(view, body)
            elif wire_type in (1, 5):
                end = body + (8 if wire_type == 1 else 4)
            else:
                raise ValueError(f"field tag {tag} at byte {pos}: unsupported wire type {wire_type}")
        except ValueError:
            if final or size - pos > _MAX_RECORD_HEADER_BYTES:
                raise
            break  # the header itself is cut off
        if end > size:
            if final:
                raise ValueError(f"record at byte {pos} runs past the end ({end} > {size} bytes)")
            break
        if end - start > max_bytes and pos > start:
            pieces.append(view[start:pos])
            start = pos
        pos = end
    if pos > start:
        pieces.append(view[start:pos])
    return pieces, pos


def image_id_list(image_ids: Sequence[str] | str) -> list[str]:
    """The ids of a delete or get: one string is one id (iterated, delete("sku-1") deleted the images "s", "k",
    "u", "-" and "1" and left "sku-1": API probe of 2026-12-05); anything but strings is InvalidRequestError."""
    try:
        ids = [image_ids] if isinstance(image_ids, str) else list(image_ids)
    except TypeError:
        raise InvalidRequestError(f"image ids must be a list of strings, got {type(image_ids).__name__}") from None
    wrong = [i for i in ids if not isinstance(i, str)]
    if wrong:
        raise InvalidRequestError(f"image ids must be strings, got {type(wrong[0]).__name__}")
    return ids


def float32_array(vector) -> np.ndarray:
    """A caller's vector (array, list...) as float32, or InvalidRequestError: text, ragged lists and 10**400 raised
    raw TypeError, ValueError or OverflowError, and numpy cut complex numbers to their real parts with only a
    warning (API probe and reviews of 2026-12-05)."""
    try:
        array = np.asarray(vector)  # a no-op for an array; a ragged list raises here
        complex_values = np.iscomplexobj(array)
        if not complex_values:
            array = array.astype(np.float32, copy=False)
    except (TypeError, ValueError, OverflowError) as exc:
        raise InvalidRequestError(f"a vector must be numbers within float32's range: {exc}") from None
    if complex_values:
        raise InvalidRequestError("a vector must be real numbers, got complex ones")
    return array


def vector_to_proto(vector: np.ndarray) -> common_pb2.Vector:
    # Building the message from raw packed bytes is ~50x faster than assigning 512 Python floats.
    raw = np.ascontiguousarray(float32_array(vector), dtype="<f4").ravel().tobytes()
    if not raw:
        return common_pb2.Vector()
    return common_pb2.Vector.FromString(bytes([_PACKED_VALUES_TAG]) + _varint(len(raw)) + raw)


def vector_from_proto(message: common_pb2.Vector) -> np.ndarray:
    raw = message.SerializeToString()  # canonical form: one packed run of little-endian float32
    if not raw:
        return np.empty(0, dtype=np.float32)
    length, pos = read_varint(raw, 1)
    if raw[0] == _PACKED_VALUES_TAG and pos + length == len(raw) and length % 4 == 0:
        return np.frombuffer(raw, dtype="<f4", offset=pos).astype(np.float32)
    return np.asarray(message.values, dtype=np.float32)  # pragma: no cover - non-canonical encodings


def attribute_value_to_proto(value: object) -> common_pb2.AttributeValue:
    # bool first: bool is an int subclass.
    if isinstance(value, (bool, np.bool_)):
        return common_pb2.AttributeValue(flag=bool(value))
    if isinstance(value, (int, float, np.integer, np.floating)):
        try:
            return common_pb2.AttributeValue(number=float(value))
        except OverflowError:  # an int past float's range (10**400)
            raise InvalidRequestError("attribute value is a number too large for a float") from None
    if isinstance(value, str):
        return common_pb2.AttributeValue(text=value)
    raise InvalidRequestError(f"attribute value {value!r} is not text, number or flag")


def attributes_to_proto(attributes: Attributes, target=None) -> dict[str, common_pb2.AttributeValue]:
    converted = {name: attribute_value_to_proto(value) for name, value in attributes.items()}
    if target is not None:
        for name, value in converted.items():
            target[name].CopyFrom(value)
    return converted


def attributes_from_proto(attributes: Mapping[str, common_pb2.AttributeValue]) -> dict[str, str | float | bool]:
    # Iterating the keys and indexing is ~1.5x faster than the map's items() view (a Python-level
    # ItemsView over upb's map), and the hits of every answer pass through here.
    converted = {}
    for name in attributes:
        value = attributes[name]
        kind = value.WhichOneof("kind")
        if kind is None:
            raise InvalidRequestError("attribute value has no text, number or flag set")
        converted[name] = getattr(value, kind)
    return converted


def condition_to_proto(condition: Condition) -> common_pb2.Condition:
    try:
        return _condition_to_proto(condition)
    except (TypeError, ValueError, OverflowError) as exc:  # a Range(min=10**400), Equals(value=5)...
        raise InvalidRequestError(f"condition on {quoted(condition.field)}: {exc}") from None


def _condition_to_proto(condition: Condition) -> common_pb2.Condition:
    p = condition.predicate
    if isinstance(p, Equals):
        return common_pb2.Condition(field=condition.field, equals=p.value)
    if isinstance(p, AnyOf):
        return common_pb2.Condition(field=condition.field, any_of=common_pb2.StringSet(values=sorted(p.values)))
    if isinstance(p, Range):
        r = common_pb2.NumberRange(exclusive=p.exclusive)
        if p.min is not None:
            r.min = p.min
        if p.max is not None:
            r.max = p.max
        return common_pb2.Condition(field=condition.field, range=r)
    if isinstance(p, Is):
        return common_pb2.Condition(field=condition.field, **{"is": p.value})
    raise InvalidRequestError(f"unknown predicate {p!r}")


def condition_from_proto(message: common_pb2.Condition) -> Condition:
    kind = message.WhichOneof("predicate")
    if kind == "equals":
        predicate = Equals(value=message.equals)
    elif kind == "any_of":
        predicate = AnyOf(values=frozenset(message.any_of.values))
    elif kind == "range":
        r = message.range
        predicate = Range(min=r.min if r.HasField("min") else None, max=r.max if r.HasField("max") else None,
                          exclusive=r.exclusive)
    elif kind == "is":
        predicate = Is(value=getattr(message, "is"))
    else:
        raise InvalidRequestError(f"condition on field {quoted(message.field)} has no predicate")
    return Condition(field=message.field, predicate=predicate)


def filter_to_proto(flt: Filter) -> common_pb2.Filter:
    return common_pb2.Filter(all_of=[condition_to_proto(c) for c in flt.all_of])


def filter_from_proto(message: common_pb2.Filter) -> Filter:
    # Sizes first, before anything is built from them: a 1M-value any_of (14 MB, under the message limit) took
    # seconds of the broker's and every shard's event loop, and each shard's mask cache kept it.
    check_filter_size(len(message.all_of), (len(c.any_of.values) for c in message.all_of))
    check_filter_text(value for c in message.all_of
                      for value in ((c.equals,) if c.WhichOneof("predicate") == "equals" else c.any_of.values))
    return Filter(all_of=tuple(condition_from_proto(c) for c in message.all_of))


def query_to_proto(query: SearchQuery) -> shard_pb2.ShardServiceSearchRequest:
    return shard_pb2.ShardServiceSearchRequest(
        vector=vector_to_proto(query.vector),
        top_k=query.top_k,
        categories=list(query.categories),
        filter=filter_to_proto(query.filter),
        options=common_pb2.SearchOptions(
            nprobe=query.nprobe,
            exactness=_EXACTNESS_TO_PROTO[query.exactness],
            distinct_products=query.distinct_products,
        ),
    )


def query_from_proto(message: shard_pb2.ShardServiceSearchRequest) -> SearchQuery:
    exactness = _EXACTNESS_FROM_PROTO.get(message.options.exactness)
    if exactness is None:
        raise InvalidRequestError(f"unknown exactness {message.options.exactness}")
    check_search_categories(message.categories)
    return SearchQuery(
        vector=vector_from_proto(message.vector),
        top_k=message.top_k,
        categories=tuple(message.categories),
        filter=filter_from_proto(message.filter),
        nprobe=message.options.nprobe,
        exactness=exactness,
        distinct_products=message.options.distinct_products,
    )


def record_to_proto(record: Record) -> shard_pb2.VectorRecord:
    return shard_pb2.VectorRecord(image_id=record.image_id, product_id=record.product_id,
                                  category=record.category, vector=vector_to_proto(record.vector),
                                  attributes=attributes_to_proto(record.attributes), version=record.version)


def record_from_proto(message: shard_pb2.VectorRecord) -> Record:
    return Record(image_id=message.image_id, product_id=message.product_id, category=message.category,
                  vector=vector_from_proto(message.vector), attributes=attributes_from_proto(message.attributes),
                  version=message.version)


def records_from_proto(messages: Iterable[shard_pb2.VectorRecord]) -> list[Record]:
    return [record_from_proto(m) for m in messages]


def _set_attributes(target, attributes: Attributes) -> None:
    # Filling the map slots in place is about twice as fast as building AttributeValue messages first; the
    # exact-type checks take the common Python types without the isinstance chain (a third of the time).
    for name, value in attributes.items():
        kind = type(value)
        if kind is str:
            target[name].text = value
            continue
        if kind is float:
            target[name].number = value
            continue
        if kind is bool:
            target[name].flag = value
            continue
        slot = target[name]
        if isinstance(value, (bool, np.bool_)):
            slot.flag = bool(value)
        elif isinstance(value, (int, float, np.integer, np.floating)):
            slot.number = float(value)
        elif isinstance(value, str):
            slot.text = value
        else:
            raise InvalidRequestError(f"attribute value {value!r} is not text, number or flag")


def add_hits(target, hits: Iterable[Hit]) -> None:
    """Append hits to a repeated Hit field in place (building Hit messages first and passing them to the
    constructor copies each one again)."""
    add = target.add
    for hit in hits:
        message = add(image_id=hit.image_id, product_id=hit.product_id, category=hit.category, score=hit.score,
                      version=hit.version)
        _set_attributes(message.attributes, hit.attributes)


def hit_from_proto(message: common_pb2.Hit) -> Hit:
    return Hit(image_id=message.image_id, product_id=message.product_id, category=message.category,
               score=message.score, attributes=attributes_from_proto(message.attributes), version=message.version)


def result_to_proto(result: SearchResult) -> shard_pb2.ShardServiceSearchResponse:
    response = shard_pb2.ShardServiceSearchResponse(candidates_scanned=result.candidates_scanned)
    add_hits(response.hits, result.hits)
    return response


def batch_to_proto(queries: Iterable[SearchQuery]) -> shard_pb2.ShardServiceSearchBatchRequest:
    return shard_pb2.ShardServiceSearchBatchRequest(searches=[query_to_proto(q) for q in queries])


def stream_request_to_proto(queries: Iterable[SearchQuery], *,
                            timeout_s: float) -> shard_pb2.ShardServiceSearchStreamRequest:
    return shard_pb2.ShardServiceSearchStreamRequest(searches=[query_to_proto(q) for q in queries],
                                                     timeout_s=timeout_s)


def add_outcome(target, outcome: SearchResult | ImgsearchError) -> None:
    """Append one search's result, or the error that refused it, to a repeated SearchOutcome field."""
    message = target.add()
    if isinstance(outcome, ImgsearchError):
        message.error.code = outcome.code.value[0]
        message.error.message = str(outcome) or outcome.code.name
        return
    message.result.candidates_scanned = outcome.candidates_scanned
    add_hits(message.result.hits, outcome.hits)


def outcomes_from_proto(
    message: shard_pb2.ShardServiceSearchBatchResponse | shard_pb2.ShardServiceSearchStreamResponse,
) -> list[SearchResult | ImgsearchError]:
    """Each search's result, or its error as the typed exception (not raised)."""
    return [
        result_from_proto(o.result) if o.WhichOneof("outcome") == "result"
        else from_status(o.error.code, o.error.message)
        for o in message.outcomes
    ]


def result_from_proto(message: shard_pb2.ShardServiceSearchResponse) -> SearchResult:
    return SearchResult(hits=tuple([hit_from_proto(h) for h in message.hits]),
                        candidates_scanned=message.candidates_scanned)


def category_stats_to_proto(c: CategoryStats) -> shard_pb2.CategoryStats:
    return shard_pb2.CategoryStats(category=c.category, vectors=c.vectors, trained=c.trained,
                                   index_type=c.index_type, resident_bytes=c.resident_bytes)


def category_stats_from_proto(c: shard_pb2.CategoryStats) -> CategoryStats:
    return CategoryStats(category=c.category, vectors=c.vectors, trained=c.trained, index_type=c.index_type,
                         resident_bytes=c.resident_bytes)


def stats_to_proto(stats: ShardStats) -> shard_pb2.ShardServiceStatsResponse:
    return shard_pb2.ShardServiceStatsResponse(
        categories=[category_stats_to_proto(c) for c in stats.categories],
        dimension=stats.dimension, wal_bytes=stats.wal_bytes)


def stats_from_proto(message: shard_pb2.ShardServiceStatsResponse) -> ShardStats:
    return ShardStats(categories=tuple(category_stats_from_proto(c) for c in message.categories),
                      dimension=message.dimension, wal_bytes=message.wal_bytes)
