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


class Tombstones:
    def __init__(self, ttl_s: float, items: Iterable[tuple[str, int]] = ()):
        self._ttl_ns = int(ttl_s * 1e9)
        self._versions: dict[str, int] = {}
        self._heap: list[tuple[int, str]] = []
        for image_id, version in items:
            self.raise_to(image_id, version)

    def __len__(self) -> int:
        return len(self._versions)

    def get(self, image_id: str) -> int | None:
        return self._versions.get(image_id)

    def raise_to(self, image_id: str, version: int) -> None:
        """Remember a delete of the id at this version (a lower one already remembered is replaced)."""
        if self._versions.get(image_id, -1) < version:
            self._versions[image_id] = version
            heapq.heappush(self._heap, (version, image_id))

    def kept_after_expiry(self, now_version: int) -> int:
        """How many `expire(now_version)` would keep (nothing is changed)."""
        cutoff = now_version - self._ttl_ns
        return sum(1 for version in self._versions.values() if version >= cutoff)

    def forget(self, image_id: str) -> None:
        """A write newer than the delete took the id."""
        self._versions.pop(image_id, None)

    def expire(self, now_version: int) -> None:
        """Forget the deletes more than ttl_s older than `now_version` (a write's version)."""
        cutoff = now_version - self._ttl_ns
        while self._heap and self._heap[0][0] < cutoff:
            version, image_id = heapq.heappop(self._heap)
            if self._versions.get(image_id) == version:
                del self._versions[image_id]
        if len(self._heap) > 2 * len(self._versions) + 1024:  # mostly superseded entries: rebuild
            self._heap = [(version, image_id) for image_id, version in self._versions.items()]
            heapq.heapify(self._heap)

    def __iter__(self) -> Iterator[str]:
        return iter(self._versions)

    def items(self) -> Iterator[tuple[str, int]]:
        """(image id, version), oldest first (the snapshot's order)."""
        return iter(sorted(self._versions.items(), key=lambda item: (item[1], item[0])))
