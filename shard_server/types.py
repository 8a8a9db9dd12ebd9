"""Plain data types of the shard tier: frozen keyword-only dataclasses; protobuf stays at the boundary
(`shard_server.convert`). The broker uses the same types, so one interface has two implementations
(the in-process engine and the gRPC client) that can be checked against each other."""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from operator import attrgetter
from typing import TypeVar

import numpy as np

from shard_server.errors import InvalidRequestError

AttributeValue = str | float | bool
Attributes = Mapping[str, AttributeValue]
T = TypeVar("T")


class Exactness(enum.Enum):
    DEFAULT = "default"
    FAST = "fast"
    HIGH = "high"
    EXACT = "exact"


@dataclass(frozen=True, kw_only=True)
class Equals:
    value: str


@dataclass(frozen=True, kw_only=True)
class AnyOf:
    values: frozenset[str]

    def __post_init__(self) -> None:
        # One value is one value: iterated, AnyOf(values="Arla") matched the brands "A", "r", "l" and "a" (review)
        if isinstance(self.values, str):
            object.__setattr__(self, "values", frozenset((self.values,)))


@dataclass(frozen=True, kw_only=True)
class Range:
    min: float | None = None
    max: float | None = None
    exclusive: bool = False


@dataclass(frozen=True, kw_only=True)
class Is:
    value: bool


Predicate = Equals | AnyOf | Range | Is


@dataclass(frozen=True, kw_only=True)
class Condition:
    field: str
    predicate: Predicate


@dataclass(frozen=True, kw_only=True)
class Filter:
    """A conjunction of conditions; the empty filter matches everything."""

    all_of: tuple[Condition, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.all_of)


@dataclass(frozen=True, kw_only=True)
class Record:
    image_id: str
    product_id: str
    category: str
    vector: np.ndarray  # float32, shape (dim,), L2-normalised by the writer or the shard
    attributes: Attributes = field(default_factory=dict)
    version: int = 0  # see VectorRecord.version: a shard keeps an id's highest; 0: unversioned, always applied


@dataclass(frozen=True, kw_only=True)
class SearchQuery:
    vector: np.ndarray  # float32, shape (dim,)
    top_k: int
    categories: tuple[str, ...] = ()  # empty: every category of the shard
    filter: Filter = Filter()
    nprobe: int = 0  # 0: derived from exactness and the server's default
    exactness: Exactness = Exactness.DEFAULT
    distinct_products: bool = False  # at most one hit per product id; top_k counts products

    def __post_init__(self) -> None:
        if isinstance(self.categories, str):  # one name is one category, not one per letter (review)
            object.__setattr__(self, "categories", (self.categories,))


@dataclass(frozen=True, kw_only=True)
class Hit:
    image_id: str
    product_id: str
    category: str
    score: float
    attributes: Attributes = field(default_factory=dict)
    version: int = 0  # the stored copy's write version (Record.version)


def newest_copies(items: Sequence[T], *, key: Callable[[T], str], version: Callable[[T], int]) -> Sequence[T]:
    """The items of each image id's newest copy (highest write version), in the given order; `items` itself when
    no id repeats. An image is held twice only when a move left a copy on its old shard (or, within a shard, while
    it is being moved between categories)."""
    newest: dict[str, int] = {}
    for item in items:
        image_id, written = key(item), version(item)
        if written > newest.get(image_id, -1):
            newest[image_id] = written
    if len(newest) == len(items):
        return items
    return [item for item in items if version(item) == newest[key(item)]]


# Scores are compared to this many decimals, and equal ones ordered by image id, in every ranking (a partition's top
# k, a shard's merge of its partitions, the broker's merge of its shards). Ties were broken by row position and
# category order instead: two replicas whose rows lay in another order (writes applied in another order) answered
# the same search differently, and identical searches alternated between them (review of 2026-12-05). Rounding
# also ties, in all but rare cases (two values either side of a rounding boundary), identical vectors whose dot
# products differ in the last bit.
SCORE_TIE_DECIMALS = 6


def rank_key(score: float, image_id: str) -> tuple[float, str]:
    """Sort key of a hit: the best score first, equal scores by image id."""
    return -round(score, SCORE_TIE_DECIMALS), image_id


def rounded_scores(scores: np.ndarray) -> np.ndarray:
    """`rank_key`'s rounding of a score array (float64, as Python's round works on floats)."""
    return np.round(scores.astype(np.float64), SCORE_TIE_DECIMALS)


def first_of_each(items: Iterable[T], key: Callable[[T], str]) -> Iterator[T]:
    """The first item of each key, in the given order (each product's best when the items come best first)."""
    seen: set[str] = set()
    for item in items:
        k = key(item)
        if k not in seen:
            seen.add(k)
            yield item


def distinct_products(hits: Iterable[Hit]) -> Iterator[Hit]:
    """The first hit of each product id, in the given order."""
    return first_of_each(hits, key=attrgetter("product_id"))


@dataclass(frozen=True, kw_only=True)
class SearchResult:
    hits: tuple[Hit, ...]
    candidates_scanned: int = 0


@dataclass(frozen=True, kw_only=True)
class CategoryStats:
    category: str
    vectors: int
    trained: bool
    index_type: str
    resident_bytes: int


@dataclass(frozen=True, kw_only=True)
class ShardStats:
    categories: tuple[CategoryStats, ...]
    dimension: int
    wal_bytes: int


__all__ = [
    "AnyOf",
    "AttributeValue",
    "Attributes",
    "CategoryStats",
    "Condition",
    "Equals",
    "Exactness",
    "Filter",
    "Hit",
    "Is",
    "Range",
    "Record",
    "SearchQuery",
    "SearchResult",
    "Sequence",
    "ShardStats",
]


# Longest image id, product id and category name a write may carry (the broker's limit too): an id the broker
# refuses could be written to a shard directly and then neither deleted nor searched by id through the broker.
MAX_ID_CHARS = 512


def normalised(vector: np.ndarray, dim: int, what: str) -> np.ndarray:
    """A float32 unit vector, or InvalidRequestError saying what is wrong with it."""
    v = np.asarray(vector, dtype=np.float32).ravel()
    if v.shape[0] != dim:
        raise InvalidRequestError(f"{what}: vector has dimension {v.shape[0]}, expected {dim}")
    # One dot product checks everything on the hot path: NaN or Inf anywhere makes it non-finite.
    norm = math.sqrt(float(np.dot(v, v)))
    if norm == 0.0 or not math.isfinite(norm):
        if not np.all(np.isfinite(v)):
            raise InvalidRequestError(f"{what}: vector contains NaN or Inf")
        scale = float(np.max(np.abs(v)))
        if scale == 0.0:
            raise InvalidRequestError(f"{what}: vector is zero (cannot be normalised)")
        # finite and non-zero, but its squared norm overflowed or underflowed float32: scale it first
        v = v / scale
        norm = math.sqrt(float(np.dot(v, v)))
    return v / norm
