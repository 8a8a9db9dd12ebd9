from imgsearch.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ShardServiceSearchRequest(_message.Message):
    __slots__ = ("vector", "top_k", "categories", "filter", "options")
    VECTOR_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    CATEGORIES_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    vector: _common_pb2.Vector
    top_k: int
    categories: _containers.RepeatedScalarFieldContainer[str]
    filter: _common_pb2.Filter
    options: _common_pb2.SearchOptions
    def __init__(self, vector: _Optional[_Union[_common_pb2.Vector, _Mapping]] = ..., top_k: _Optional[int] = ..., categories: _Optional[_Iterable[str]] = ..., filter: _Optional[_Union[_common_pb2.Filter, _Mapping]] = ..., options: _Optional[_Union[_common_pb2.SearchOptions, _Mapping]] = ...) -> None: ...

class ShardServiceSearchResponse(_message.Message):
    __slots__ = ("hits", "candidates_scanned")
    HITS_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_SCANNED_FIELD_NUMBER: _ClassVar[int]
    hits: _containers.RepeatedCompositeFieldContainer[_common_pb2.Hit]
    candidates_scanned: int
    def __init__(self, hits: _Optional[_Iterable[_Union[_common_pb2.Hit, _Mapping]]] = ..., candidates_scanned: _Optional[int] = ...) -> None: ...

class ShardServiceSearchBatchRequest(_message.Message):
    __slots__ = ("searches",)
    SEARCHES_FIELD_NUMBER: _ClassVar[int]
    searches: _containers.RepeatedCompositeFieldContainer[ShardServiceSearchRequest]
    def __init__(self, searches: _Optional[_Iterable[_Union[ShardServiceSearchRequest, _Mapping]]] = ...) -> None: ...

class ShardServiceSearchBatchResponse(_message.Message):
    __slots__ = ("outcomes",)
    OUTCOMES_FIELD_NUMBER: _ClassVar[int]
    outcomes: _containers.RepeatedCompositeFieldContainer[SearchOutcome]
    def __init__(self, outcomes: _Optional[_Iterable[_Union[SearchOutcome, _Mapping]]] = ...) -> None: ...

class ShardServiceSearchStreamRequest(_message.Message):
    __slots__ = ("searches", "timeout_s")
    SEARCHES_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    searches: _containers.RepeatedCompositeFieldContainer[ShardServiceSearchRequest]
    timeout_s: float
    def __init__(self, searches: _Optional[_Iterable[_Union[ShardServiceSearchRequest, _Mapping]]] = ..., timeout_s: _Optional[float] = ...) -> None: ...

class ShardServiceSearchStreamResponse(_message.Message):
    __slots__ = ("outcomes",)
    OUTCOMES_FIELD_NUMBER: _ClassVar[int]
    outcomes: _containers.RepeatedCompositeFieldContainer[SearchOutcome]
    def __init__(self, outcomes: _Optional[_Iterable[_Union[SearchOutcome, _Mapping]]] = ...) -> None: ...

class SearchOutcome(_message.Message):
    __slots__ = ("result", "error")
    RESULT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    result: ShardServiceSearchResponse
    error: SearchError
    def __init__(self, result: _Optional[_Union[ShardServiceSearchResponse, _Mapping]] = ..., error: _Optional[_Union[SearchError, _Mapping]] = ...) -> None: ...

class SearchError(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class VectorRecord(_message.Message):
    __slots__ = ("image_id", "product_id", "category", "vector", "attributes", "version")
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
    VECTOR_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTES_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    image_id: str
    product_id: str
    category: str
    vector: _common_pb2.Vector
    attributes: _containers.MessageMap[str, _common_pb2.AttributeValue]
    version: int
    def __init__(self, image_id: _Optional[str] = ..., product_id: _Optional[str] = ..., category: _Optional[str] = ..., vector: _Optional[_Union[_common_pb2.Vector, _Mapping]] = ..., attributes: _Optional[_Mapping[str, _common_pb2.AttributeValue]] = ..., version: _Optional[int] = ...) -> None: ...

class UpsertRequest(_message.Message):
    __slots__ = ("records", "validate_only")
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    VALIDATE_ONLY_FIELD_NUMBER: _ClassVar[int]
    records: _containers.RepeatedCompositeFieldContainer[VectorRecord]
    validate_only: bool
    def __init__(self, records: _Optional[_Iterable[_Union[VectorRecord, _Mapping]]] = ..., validate_only: _Optional[bool] = ...) -> None: ...

class UpsertResponse(_message.Message):
    __slots__ = ("upserted",)
    UPSERTED_FIELD_NUMBER: _ClassVar[int]
    upserted: int
    def __init__(self, upserted: _Optional[int] = ...) -> None: ...

class UpsertStreamRequest(_message.Message):
    __slots__ = ("records", "commit")
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    COMMIT_FIELD_NUMBER: _ClassVar[int]
    records: _containers.RepeatedCompositeFieldContainer[VectorRecord]
    commit: bool
    def __init__(self, records: _Optional[_Iterable[_Union[VectorRecord, _Mapping]]] = ..., commit: _Optional[bool] = ...) -> None: ...

class UpsertStreamResponse(_message.Message):
    __slots__ = ("upserted",)
    UPSERTED_FIELD_NUMBER: _ClassVar[int]
    upserted: int
    def __init__(self, upserted: _Optional[int] = ...) -> None: ...

class ShardServiceDeleteRequest(_message.Message):
    __slots__ = ("image_ids", "version")
    IMAGE_IDS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    image_ids: _containers.RepeatedScalarFieldContainer[str]
    version: int
    def __init__(self, image_ids: _Optional[_Iterable[str]] = ..., version: _Optional[int] = ...) -> None: ...

class ShardServiceDeleteResponse(_message.Message):
    __slots__ = ("deleted",)
    DELETED_FIELD_NUMBER: _ClassVar[int]
    deleted: int
    def __init__(self, deleted: _Optional[int] = ...) -> None: ...

class ShardServiceGetRequest(_message.Message):
    __slots__ = ("image_ids",)
    IMAGE_IDS_FIELD_NUMBER: _ClassVar[int]
    image_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, image_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class ShardServiceGetResponse(_message.Message):
    __slots__ = ("records",)
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    records: _containers.RepeatedCompositeFieldContainer[VectorRecord]
    def __init__(self, records: _Optional[_Iterable[_Union[VectorRecord, _Mapping]]] = ...) -> None: ...

class ShardServiceStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CategoryStats(_message.Message):
    __slots__ = ("category", "vectors", "trained", "index_type", "resident_bytes")
    CATEGORY_FIELD_NUMBER: _ClassVar[int]
    VECTORS_FIELD_NUMBER: _ClassVar[int]
    TRAINED_FIELD_NUMBER: _ClassVar[int]
    INDEX_TYPE_FIELD_NUMBER: _ClassVar[int]
    RESIDENT_BYTES_FIELD_NUMBER: _ClassVar[int]
    category: str
    vectors: int
    trained: bool
    index_type: str
    resident_bytes: int
    def __init__(self, category: _Optional[str] = ..., vectors: _Optional[int] = ..., trained: _Optional[bool] = ..., index_type: _Optional[str] = ..., resident_bytes: _Optional[int] = ...) -> None: ...

class ShardServiceStatsResponse(_message.Message):
    __slots__ = ("categories", "dimension", "wal_bytes")
    CATEGORIES_FIELD_NUMBER: _ClassVar[int]
    DIMENSION_FIELD_NUMBER: _ClassVar[int]
    WAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    categories: _containers.RepeatedCompositeFieldContainer[CategoryStats]
    dimension: int
    wal_bytes: int
    def __init__(self, categories: _Optional[_Iterable[_Union[CategoryStats, _Mapping]]] = ..., dimension: _Optional[int] = ..., wal_bytes: _Optional[int] = ...) -> None: ...
