"""Plain data types of the broker's API (protobuf stays at the boundary: broker.convert)."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from shard_server.types import CategoryStats, Exactness, Filter, Hit


class CacheOutcome(enum.Enum):
    NOT_USED = "not_used"  # vector query, a filter, no cache configured, or skipped on request
    MISS = "miss"
    EXACT = "exact"  # both 64-bit hashes identical to a catalogue image's
    NEAR = "near"  # within the Hamming radii and confirmed by embedding similarity
    ERROR = "error"  # Redis down or slow: bypassed


@dataclass(frozen=True, kw_only=True)
class Query:
    """A search: exactly one of `image` (encoded bytes), `vector` or `image_id` (a catalogue image's stored
    vector; the image itself is left out of the hits)."""

    image: bytes | None = None
    vector: np.ndarray | None = None
    image_id: str | None = None
    top_k: int = 10
    categories: tuple[str, ...] = ()
    filter: Filter = Filter()
    nprobe: int = 0
    exactness: Exactness = Exactness.DEFAULT
    use_duplicate_cache: bool = True
    distinct_products: bool = False  # at most one hit per product id; top_k counts products


@dataclass(frozen=True, kw_only=True)
class ShardReport:
    shard: str
    address: str
    outcome: str  # ok | timeout | unavailable | error
    message: str = ""


@dataclass(frozen=True, kw_only=True)
class StageTimings:
    decode_hash_s: float = 0.0
    cache_s: float = 0.0
    embed_s: float = 0.0
    fanout_s: float = 0.0
    merge_s: float = 0.0
    total_s: float = 0.0


@dataclass(frozen=True, kw_only=True)
class SearchAnswer:
    hits: tuple[Hit, ...]
    cache: CacheOutcome
    from_duplicate_cache: bool
    partial: bool
    shards: tuple[ShardReport, ...] = ()
    timings: StageTimings = StageTimings()


@dataclass(frozen=True, kw_only=True)
class CatalogueItem:
    """A catalogue image to add: exactly one of `image` (encoded bytes) or `vector`."""

    image_id: str
    product_id: str
    category: str
    image: bytes | None = None
    vector: np.ndarray | None = None
    attributes: Mapping[str, str | float | bool] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class IngestSummary:
    ingested: int
    cache_pending: int = 0


@dataclass(frozen=True, kw_only=True)
class ShardSummary:
    shard: str
    address: str
    reachable: bool
    categories: tuple[CategoryStats, ...] = ()  # as the shard reports them
