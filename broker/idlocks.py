"""Per-image-id locks: the writes of one image id through this broker happen one at a time.

An ingest writes an image to the shard that owns its category and then removes the id from every other shard
(the image may have moved category). Two concurrent ingests of one id into categories of two different shards
each removed the other's write, and the image ended up on no shard although both calls were acknowledged.
Holding the id for the write, the removal and the cache write makes the later call win, whole.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterable

from broker.errors import WriteWaitTimeoutError


class ImageIdLocks:
    def __init__(self) -> None:
        self._locks: dict[str, asyncio.Lock] = {}
        self._holders: dict[str, int] = {}  # callers holding or waiting for each lock; the lock goes at zero

    @contextlib.asynccontextmanager
    async def hold(self, image_ids: Iterable[str], *, timeout_s: float) -> AsyncIterator[None]:
        """Hold every id (in sorted order, so two callers with overlapping ids cannot deadlock); raises
        WriteWaitTimeoutError (DEADLINE_EXCEEDED) when earlier writes of the same ids outlast `timeout_s`."""
        ids = sorted(set(image_ids))
        for image_id in ids:
            self._holders[image_id] = self._holders.get(image_id, 0) + 1
            self._locks.setdefault(image_id, asyncio.Lock())
        acquired: list[asyncio.Lock] = []
        try:
            try:
                async with asyncio.timeout(timeout_s):
                    for image_id in ids:
                        lock = self._locks[image_id]
                        await lock.acquire()  # no suspension when free: the common case costs no loop round
                        acquired.append(lock)
            except TimeoutError:
                raise WriteWaitTimeoutError(
                    f"an earlier write of the same image id did not finish within {timeout_s:.3f}s"
                ) from None
            yield
        finally:
            for lock in acquired:
                lock.release()
            for image_id in ids:
                left = self._holders[image_id] - 1
                if left:
                    self._holders[image_id] = left
                else:
                    del self._holders[image_id]
                    del self._locks[image_id]

    def __len__(self) -> int:
        return len(self._locks)
