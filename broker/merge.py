"""k-way merge of per-shard top-K lists into the global top-K."""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterable, Sequence
from operator import attrgetter

from shard_server.types import Hit, distinct_products, first_of_each, newest_copies


def merge_top_k(hit_lists: Iterable[Sequence[Hit]], top_k: int, *, distinct: bool = False) -> tuple[Hit, ...]:
    """Each list is sorted again defensively (cheap: at most top_k per shard), then merged lazily. With
    `distinct`, a product's best hit only (the shards' lists are distinct already, but a product whose images
    were filed under categories of two shards appears in both)."""
    lists = [sorted(h, key=lambda x: -x.score) for h in hit_lists]
    if len(lists) > 1:
        # An image moved to another shard's category while its old shard was down can stay there (see
        # broker/removal_hints.py): one answer lists it once, as its newest copy (the write versions).
        newest = {h.image_id: h.version for h in newest_copies([h for hits in lists for h in hits])}
        if len(newest) < sum(map(len, lists)):  # some image twice
            lists = [[h for h in hits if h.version == newest[h.image_id]] for hits in lists]
    merged = heapq.merge(*lists, key=lambda x: -x.score)
    merged = first_of_each(merged, key=attrgetter("image_id"))
    if distinct:
        merged = distinct_products(merged)
    return tuple(itertools.islice(merged, top_k))
