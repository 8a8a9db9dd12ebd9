from imgsearch.v1 import common_pb2 as _common_pb2
from imgsearch.v1 import shard_pb2 as _shard_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CacheOutcome(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CACHE_OUTCOME_UNSPECIFIED: _ClassVar[CacheOutcome]
    CACHE_OUTCOME_NOT_USED: _ClassVar[CacheOutcome]
    CACHE_OUTCOME_MISS: _ClassVar[CacheOutcome]
    CACHE_OUTCOME_EXACT: _ClassVar[CacheOutcome]
    CACHE_OUTCOME_NEAR: _ClassVar[CacheOutcome]
    CACHE_OUTCOME_ERROR: _ClassVar[CacheOutcome]

class ShardOutcome(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SHARD_OUTCOME_UNSPECIFIED: _ClassVar[ShardOutcome]
    SHARD_OUTCOME_OK: _ClassVar[ShardOutcome]
    SHARD_OUTCOME_TIMEOUT: _ClassVar[ShardOutcome]
    SHARD_OUTCOME_UNAVAILABLE: _ClassVar[ShardOutcome]
    SHARD_OUTCOME_ERROR: _ClassVar[ShardOutcome]
CACHE_OUTCOME_UNSPECIFIED: CacheOutcome
CACHE_OUTCOME_NOT_USED: CacheOutcome
CACHE_OUTCOME_MISS: CacheOutcome
CACHE_OUTCOME_EXACT: CacheOutcome
CACHE_OUTCOME_NEAR: CacheOutcome
CACHE_OUTCOME_ERROR: CacheOutcome
SHARD_OUTCOME_UNSPECIFIED: ShardOutcome
SHARD_OUTCOME_OK: ShardOutcome
SHARD_OUTCOME_TIMEOUT: ShardOutcome
SHARD_OUTCOME_UNAVAILABLE: ShardOutcome
SHARD_OUTCOME_ERROR: ShardOutcome

class SearchRequest(_message.Message):
    __slots__ = ("image", "vector", "image_id", "top_k", "categories", "filter", "options", "skip_duplicate_cache")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    VECTOR_FIELD_NUMBER: _ClassVar[int]
    IMAGE_ID_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    CATEGORIES_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    SKIP_DUPLICATE_CACHE_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    vector: _common_pb2.Vector
    image_id: str
    top_k: int
    categories: _containers.RepeatedScalarFieldContainer[str]
    filter: _common_pb2.Filter
    options: _common_pb2.SearchOptions
    skip_duplicate_cache: bool
    def __init__(self, image: _Optional[bytes] = ..., vector: _Optional[_Union[_common_pb2.Vector, _Mapping]] = ..., image_id: _Optional[str] = ..., top_k: _Optional[int] = ..., categories: _Optional[_Iterable[str]] = ..., filter: _Optional[_Union[_common_pb2.Filter, _Mapping]] = ..., options: _Optional[_Union[_common_pb2.SearchOptions, _Mapping]] = ..., skip_duplicate_cache: _Optional[bool] = ...) -> None: ...

class SearchStreamRequest(_message.Message):
    __slots__ = ("search", "timeout_s")
    SEARCH_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    search: SearchRequest
    timeout_s: float
    def __init__(self, search: _Optional[_Union[SearchRequest, _Mapping]] = ..., timeout_s: _Optional[float] = ...) -> None: ...

class SearchStreamResponse(_message.Message):
    __slots__ = ("result", "error")
    RESULT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    result: SearchResponse
    error: _shard_pb2.SearchError
    def __init__(self, result: _Optional[_Union[SearchResponse, _Mapping]] = ..., error: _Optional[_Union[_shard_pb2.SearchError, _Mapping]] = ...) -> None: ...

class ShardReport(_message.Message):
    __slots__ = ("shard", "address", "outcome", "message")
    SHARD_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    shard: str
    address: str
    outcome: ShardOutcome
    message: str
    def __init__(self, shard: _Optional[str] = ..., address: _Optional[str] = ..., outcome: _Optional[_Union[ShardOutcome, str]] = ..., message: _Optional[str] = ...) -> None: ...

class StageTimings(_message.Message):
    __slots__ = ("decode_hash_seconds", "cache_seconds", "embed_seconds", "fanout_seconds", "merge_seconds", "total_seconds")
    DECODE_HASH_SECONDS_FIELD_NUMBER: _ClassVar[int]
    CACHE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    EMBED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    FANOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MERGE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    decode_hash_seconds: float
    cache_seconds: float
    embed_seconds: float
    fanout_seconds: float
    merge_seconds: float
    total_seconds: float
    def __init__(self, decode_hash_seconds: _Optional[float] = ..., cache_seconds: _Optional[float] = ..., embed_seconds: _Optional[float] = ..., fanout_seconds: _Optional[float] = ..., merge_seconds: _Optional[float] = ..., total_seconds: _Optional[float] = ...) -> None: ...

class SearchResponse(_message.Message):
    __slots__ = ("hits", "cache", "from_duplicate_cache", "partial", "shards", "timings")
    HITS_FIELD_NUMBER: _ClassVar[int]
    CACHE_FIELD_NUMBER: _ClassVar[int]
    FROM_DUPLICATE_CACHE_FIELD_NUMBER: _ClassVar[int]
    PARTIAL_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    hits: _containers.RepeatedCompositeFieldContainer[_common_pb2.Hit]
    cache: CacheOutcome
    from_duplicate_cache: bool
    partial: bool
    shards: _containers.RepeatedCompositeFieldContainer[ShardReport]
    timings: StageTimings
    def __init__(self, hits: _Optional[_Iterable[_Union[_common_pb2.Hit, _Mapping]]] = ..., cache: _Optional[_Union[CacheOutcome, str]] = ..., from_duplicate_cache: _Optional[bool] = ..., partial: _Optional[bool] = ..., shards: _Optional[_Iterable[_Union[ShardReport, _Mapping]]] = ..., timings: _Optional[_Union[StageTimings, _Mapping]] = ...) -> None: ...

class CatalogueItem(_message.Message):
    __slots__ = ("image_id", "product_id", "category", "image", "vector", "attributes")
    class AttributesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _common_pb2.AttributeValue
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_common_pb2.AttributeValue, _Mapping]] = ...) -> None: ...
    IMAGE_ID_FIELD_NUMBER: _ClassVar[int]
    PRODUCT_ID_FIELD_NUMBER: _ClassVar[int]
    CATEGORY_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    VECTOR_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTES_FIELD_NUMBER: _ClassVar[int]
    image_id: str
    product_id: str
    category: str
    image: bytes
    vector: _common_pb2.Vector
    attributes: _containers.MessageMap[str, _common_pb2.AttributeValue]
    def __init__(self, image_id: _Optional[str] = ..., product_id: _Optional[str] = ..., category: _Optional[str] = ..., image: _Optional[bytes] = ..., vector: _Optional[_Union[_common_pb2.Vector, _Mapping]] = ..., attributes: _Optional[_Mapping[str, _common_pb2.AttributeValue]] = ...) -> None: ...

class IngestRequest(_message.Message):
    __slots__ = ("item",)
    ITEM_FIELD_NUMBER: _ClassVar[int]
    item: CatalogueItem
    def __init__(self, item: _Optional[_Union[CatalogueItem, _Mapping]] = ...) -> None: ...

class IngestStreamRequest(_message.Message):
    __slots__ = ("item",)
    ITEM_FIELD_NUMBER: _ClassVar[int]
    item: CatalogueItem
    def __init__(self, item: _Optional[_Union[CatalogueItem, _Mapping]] = ...) -> None: ...

class IngestStreamResponse(_message.Message):
    __slots__ = ("ingested", "cache_pending")
    INGESTED_FIELD_NUMBER: _ClassVar[int]
    CACHE_PENDING_FIELD_NUMBER: _ClassVar[int]
    ingested: int
    cache_pending: int
    def __init__(self, ingested: _Optional[int] = ..., cache_pending: _Optional[int] = ...) -> None: ...

class IngestResponse(_message.Message):
    __slots__ = ("ingested", "cache_pending")
    INGESTED_FIELD_NUMBER: _ClassVar[int]
    CACHE_PENDING_FIELD_NUMBER: _ClassVar[int]
    ingested: int
    cache_pending: int
    def __init__(self, ingested: _Optional[int] = ..., cache_pending: _Optional[int] = ...) -> None: ...

class BrokerServiceDeleteRequest(_message.Message):
    __slots__ = ("image_ids",)
    IMAGE_IDS_FIELD_NUMBER: _ClassVar[int]
    image_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, image_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class BrokerServiceDeleteResponse(_message.Message):
    __slots__ = ("deleted",)
    DELETED_FIELD_NUMBER: _ClassVar[int]
    deleted: int
    def __init__(self, deleted: _Optional[int] = ...) -> None: ...

class BrokerServiceStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ShardStats(_message.Message):
    __slots__ = ("shard", "address", "reachable", "categories")
    SHARD_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    REACHABLE_FIELD_NUMBER: _ClassVar[int]
    CATEGORIES_FIELD_NUMBER: _ClassVar[int]
    shard: str
    address: str
    reachable: bool
    categories: _containers.RepeatedCompositeFieldContainer[_shard_pb2.CategoryStats]
    def __init__(self, shard: _Optional[str] = ..., address: _Optional[str] = ..., reachable: _Optional[bool] = ..., categories: _Optional[_Iterable[_Union[_shard_pb2.CategoryStats, _Mapping]]] = ...) -> None: ...

class BrokerServiceStatsResponse(_message.Message):
    __slots__ = ("shards",)
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    shards: _containers.RepeatedCompositeFieldContainer[ShardStats]
    def __init__(self, shards: _Optional[_Iterable[_Union[ShardStats, _Mapping]]] = ...) -> None: ...
