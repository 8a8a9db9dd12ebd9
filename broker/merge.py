"""k-way merge of per-shard top-K lists into the global top-K."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from operator import attrgetter

from shard_server.types import Hit, distinct_products, first_of_each, newest_copies, rank_key


def merge_top_k(hit_lists: Iterable[Sequence[Hit]], top_k: int, *, distinct: bool = False) -> tuple[Hit, ...]:
    """All hits sorted by score (at most top_k per shard) and each image listed once. With `distinct`, a product's
    best hit only (the shards' lists are distinct already, but a product whose images were filed under categories
    of two shards appears in both)."""
    # An image moved to another shard's category while its old shard was down can stay there (see
    # broker/removal_hints.py): one answer lists it once, as its newest copy (the write versions).
    hits = newest_copies([h for hits in hit_lists for h in hits], key=attrgetter("image_id"),
                         version=attrgetter("version"))
    merged = first_of_each(sorted(hits, key=lambda x: rank_key(x.score, x.image_id)), key=attrgetter("image_id"))
    if distinct:
        merged = distinct_products(merged)
    return tuple(itertools.islice(merged, top_k))
