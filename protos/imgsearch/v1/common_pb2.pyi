from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Exactness(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EXACTNESS_UNSPECIFIED: _ClassVar[Exactness]
    EXACTNESS_FAST: _ClassVar[Exactness]
    EXACTNESS_HIGH: _ClassVar[Exactness]
    EXACTNESS_EXACT: _ClassVar[Exactness]
EXACTNESS_UNSPECIFIED: Exactness
EXACTNESS_FAST: Exactness
EXACTNESS_HIGH: Exactness
EXACTNESS_EXACT: Exactness

class Vector(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, values: _Optional[_Iterable[float]] = ...) -> None: ...

class AttributeValue(_message.Message):
    __slots__ = ("text", "number", "flag")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    NUMBER_FIELD_NUMBER: _ClassVar[int]
    FLAG_FIELD_NUMBER: _ClassVar[int]
    text: str
    number: float
    flag: bool
    def __init__(self, text: _Optional[str] = ..., number: _Optional[float] = ..., flag: _Optional[bool] = ...) -> None: ...

class StringSet(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, values: _Optional[_Iterable[str]] = ...) -> None: ...

class NumberRange(_message.Message):
    __slots__ = ("min", "max", "exclusive")
    MIN_FIELD_NUMBER: _ClassVar[int]
    MAX_FIELD_NUMBER: _ClassVar[int]
    EXCLUSIVE_FIELD_NUMBER: _ClassVar[int]
    min: float
    max: float
    exclusive: bool
    def __init__(self, min: _Optional[float] = ..., max: _Optional[float] = ..., exclusive: _Optional[bool] = ...) -> None: ...

class Condition(_message.Message):
    __slots__ = ("field", "equals", "any_of", "range")
    FIELD_FIELD_NUMBER: _ClassVar[int]
    EQUALS_FIELD_NUMBER: _ClassVar[int]
    ANY_OF_FIELD_NUMBER: _ClassVar[int]
    RANGE_FIELD_NUMBER: _ClassVar[int]
    IS_FIELD_NUMBER: _ClassVar[int]
    field: str
    equals: str
    any_of: StringSet
    range: NumberRange
    def __init__(self, field: _Optional[str] = ..., equals: _Optional[str] = ..., any_of: _Optional[_Union[StringSet, _Mapping]] = ..., range: _Optional[_Union[NumberRange, _Mapping]] = ..., **kwargs) -> None: ...

class Filter(_message.Message):
    __slots__ = ("all_of",)
    ALL_OF_FIELD_NUMBER: _ClassVar[int]
    all_of: _containers.RepeatedCompositeFieldContainer[Condition]
    def __init__(self, all_of: _Optional[_Iterable[_Union[Condition, _Mapping]]] = ...) -> None: ...

class SearchOptions(_message.Message):
    __slots__ = ("nprobe", "exactness", "distinct_products")
    NPROBE_FIELD_NUMBER: _ClassVar[int]
    EXACTNESS_FIELD_NUMBER: _ClassVar[int]
    DISTINCT_PRODUCTS_FIELD_NUMBER: _ClassVar[int]
    nprobe: int
    exactness: Exactness
    distinct_products: bool
    def __init__(self, nprobe: _Optional[int] = ..., exactness: _Optional[_Union[Exactness, str]] = ..., distinct_products: _Optional[bool] = ...) -> None: ...

class Hit(_message.Message):
    __slots__ = ("image_id", "product_id", "category", "score", "attributes", "version")
    class AttributesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: AttributeValue
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[AttributeValue, _Mapping]] = ...) -> None: ...
    IMAGE_ID_FIELD_NUMBER: _ClassVar[int]
    PRODUCT_ID_FIELD_NUMBER: _ClassVar[int]
    CATEGORY_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTES_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    image_id: str
    product_id: str
    category: str
    score: float
    attributes: _containers.MessageMap[str, AttributeValue]
    version: int
    def __init__(self, image_id: _Optional[str] = ..., product_id: _Optional[str] = ..., category: _Optional[str] = ..., score: _Optional[float] = ..., attributes: _Optional[_Mapping[str, AttributeValue]] = ..., version: _Optional[int] = ...) -> None: ...
