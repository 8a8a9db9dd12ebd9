"""k-way merge of per-shard top-K lists into the global top-K."""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterable, Sequence
from operator import attrgetter

from shard_server.types import Hit, distinct_products, first_of_each


def merge_top_k(hit_lists: Iterable[Sequence[Hit]], top_k: int, *, distinct: bool = False) -> tuple[Hit, ...]:
    """Each list is sorted again defensively (cheap: at most top_k per shard), then merged lazily. With
    `distinct`, a product's best hit only (the shards' lists are distinct already, but a product whose images
    were filed under categories of two shards appears in both)."""
    merged = heapq.merge(*(sorted(h, key=lambda x: -x.score) for h in hit_lists), key=lambda x: -x.score)
    # An image re-ingested under another shard's category while its former shard was down stays there until
    # re-ingested again (ShardPool.upsert): one answer must still list it once (its best hit, as a shard does).
    merged = first_of_each(merged, key=attrgetter("image_id"))
    if distinct:
        merged = distinct_products(merged)
    return tuple(itertools.islice(merged, top_k))
