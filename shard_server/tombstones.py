"""Versioned deletes a shard remembers (image id -> delete version), so that a write older than the delete that
arrives after it is dropped; forgotten once the write versions have moved `ttl_s` past them.

Expiry goes by version, not by arrival: replicas that received the same deletes in different orders (two brokers'
deletes, stale-copy removals) forget the same ones at the same write, and so does a log replay, which may apply a
few writes twice around a snapshot. A min-heap of (version, id) finds the expired ones; entries that a newer delete
of the id or a write superseded stay in the heap until their version expires, and are skipped then.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Iterator

_NS = 1_000_000_000


class Tombstones:
    def __init__(self, ttl_s: float, items: Iterable[tuple[str, int]] = ()):
        self._ttl_ns = int(ttl_s * 1e9)
        self._versions: dict[str, int] = {}
        self._heap: list[tuple[int, str]] = []
        # Remembered deletes per second of their version: kept_after_expiry in O(ttl_s) (counting 2 million
        # versions held the write lock and the GIL ~50 ms at each delete while the budget was full, review)
        self._per_second: dict[int, int] = {}
        for image_id, version in items:
            self.raise_to(image_id, version)

    def __len__(self) -> int:
        return len(self._versions)

    def get(self, image_id: str) -> int | None:
        return self._versions.get(image_id)

    def raise_to(self, image_id: str, version: int) -> None:
        """Remember a delete of the id at this version (a lower one already remembered is replaced)."""
        held = self._versions.get(image_id)
        if held is None or held < version:
            if held is not None:
                self._uncount(held)
            self._versions[image_id] = version
            self._per_second[version // _NS] = self._per_second.get(version // _NS, 0) + 1
            heapq.heappush(self._heap, (version, image_id))

    def kept_after_expiry(self, now_version: int) -> int:
        """At least how many `expire(now_version)` would keep (those of the second of the cutoff are counted as
        kept); nothing is changed."""
        cutoff_second = (now_version - self._ttl_ns) // _NS
        return len(self._versions) - sum(n for second, n in self._per_second.items() if second < cutoff_second)

    def _uncount(self, version: int) -> None:
        second = version // _NS
        left = self._per_second[second] - 1
        if left:
            self._per_second[second] = left
        else:
            del self._per_second[second]

    def forget(self, image_id: str) -> None:
        """A write newer than the delete took the id."""
        version = self._versions.pop(image_id, None)
        if version is not None:
            self._uncount(version)

    def expire(self, now_version: int) -> None:
        """Forget the deletes more than ttl_s older than `now_version` (a write's version)."""
        cutoff = now_version - self._ttl_ns
        while self._heap and self._heap[0][0] < cutoff:
            version, image_id = heapq.heappop(self._heap)
            if self._versions.get(image_id) == version:
                del self._versions[image_id]
                self._uncount(version)
        if len(self._heap) > 2 * len(self._versions) + 1024:  # mostly superseded entries: rebuild
            self._heap = [(version, image_id) for image_id, version in self._versions.items()]
            heapq.heapify(self._heap)

    def __iter__(self) -> Iterator[str]:
        return iter(self._versions)

    def items(self) -> Iterator[tuple[str, int]]:
        """(image id, version), oldest first (the snapshot's order)."""
        return iter(sorted(self._versions.items(), key=lambda item: (item[1], item[0])))
