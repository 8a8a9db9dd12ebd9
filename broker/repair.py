"""Cache writes that failed (Redis down or slow), kept in the broker and retried by a background loop.

The shard is the source of truth; the duplicate cache is derived from it. When a cache write fails the ingest
or delete still succeeds (the shard made it durable) and the write waits here. Only the latest pending write
per image id is kept (a later upsert or delete supersedes an earlier one). The queue lives in the broker's
memory, at most MAX_PENDING_WRITES of them (the rest are dropped and counted): a broker restarted while writes
are pending loses them (the gauge shows how many there were); the gap is then only a missed cache answer, never a
wrong one: a missing entry sends the search to the index, and a left-over one is checked with its shard before it
answers (broker/core.py).
"""

from __future__ import annotations

import asyncio
import logging

from broker.background import stop_task
from broker.cache import CacheEntry, CacheUnavailable, DuplicateCache
from broker.metrics import CACHE_REPAIR_DROPPED, CACHE_REPAIR_PENDING

log = logging.getLogger(__name__)

# Pending writes kept at most (~55 MB); past it new ones are dropped and counted.
MAX_PENDING_WRITES = 20_000
# A pending write: the entry to upsert, or None to delete.
PendingWrite = CacheEntry | None
# No pending write for an id (None is a pending delete, so it cannot mean "absent").
_NONE_PENDING = object()


class CacheRepairQueue:
    def __init__(self, cache: DuplicateCache, *, interval_s: float = 1.0):
        self._cache = cache
        self._interval_s = interval_s
        self._pending: dict[str, PendingWrite] = {}
        self._task: asyncio.Task | None = None

    def __len__(self) -> int:
        return len(self._pending)

    def add(self, image_id: str, write: PendingWrite) -> None:
        if image_id not in self._pending and len(self._pending) >= MAX_PENDING_WRITES:
            # Dropping is safe: a lost upsert is a cache miss later, a lost delete an entry that the shards'
            # check of every cache answer finds stale (broker/core.py). Keeping them all is not: ~2.7 KB each
            # (the embedding), 2.7 GB for a million images re-ingested during an outage.
            CACHE_REPAIR_DROPPED.inc()
            return
        self._pending[image_id] = write
        CACHE_REPAIR_PENDING.set(len(self._pending))

    def discard(self, image_id: str) -> None:
        """A newer successful write to this id makes the pending one obsolete."""
        self._pending.pop(image_id, None)
        CACHE_REPAIR_PENDING.set(len(self._pending))

    async def repair_once(self) -> int:
        """Retry every pending write once; returns how many went through."""
        done = 0
        for image_id, write in list(self._pending.items()):
            if self._pending.get(image_id, _NONE_PENDING) is not write:
                continue  # superseded (or applied by a newer successful write) since the round began
            try:
                if write is None:
                    await self._cache.delete(image_id)
                else:
                    await self._cache.upsert(write)
            except CacheUnavailable:
                break  # Redis still down: try again next round
            if self._pending.get(image_id, _NONE_PENDING) is write:
                del self._pending[image_id]
            done += 1
        CACHE_REPAIR_PENDING.set(len(self._pending))
        if done:
            log.info("cache repair: %d writes applied, %d pending", done, len(self._pending))
        return done

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="cache-repair")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            if self._pending:
                try:
                    await self.repair_once()
                except Exception:  # the loop must survive anything
                    log.exception("cache repair round failed")

    async def stop(self) -> None:
        if self._task is not None:
            await stop_task(self._task)
