"""Stale-copy removals that a shard replica missed, kept in the broker and retried until the replica takes them.

An ingest that moves an image to a category of another shard removes the id from the shard it left. A replica
that is down then keeps the old copy: the ingest fails (UNAVAILABLE), but its retry succeeds without that replica
(the replicas that answered hold nothing to remove any more), and the copy came back with the replica. Each
missed removal is kept here per replica address and sent again every `interval_s` until it goes through.

The removal is versioned (broker/versions.py): it takes only copies written before the ingest, so sending it late
never removes a newer write of the id. The hints live in the broker's memory: a broker restarted while some are
pending loses them (the gauge shows how many there were), and such a copy stays until its id is written again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable

from broker.metrics import PENDING_REMOVALS, REMOVAL_HINTS_DROPPED
from imgsearch.errors import ImgsearchError

log = logging.getLogger(__name__)

# Ids per Delete call of a retry round (the shards accept 10,000 per request).
RETRY_BATCH_IDS = 1_000
# Removals kept at most, over all replicas (~150 bytes each): a shard down for long while every ingest hints all of
# its ids to it must not grow the broker without bound. Past it, new ones are dropped, logged and counted.
MAX_PENDING_IDS = 200_000
# On a graceful stop, what is pending is sent once more, for at most this long.
FLUSH_ON_STOP_S = 2.0


class RemovalHints:
    def __init__(self, *, interval_s: float = 1.0, timeout_s: float = 2.0):
        self._interval_s = interval_s
        self._timeout_s = timeout_s
        self._clients: dict[str, object] = {}  # replica address -> its ShardClient
        self._pending: dict[str, dict[str, int]] = {}  # replica address -> image id -> removal version
        self._task: asyncio.Task | None = None

    def __len__(self) -> int:
        return sum(map(len, self._pending.values()))

    def add(self, address: str, client, image_ids: Iterable[str], version: int) -> None:
        """Remember removals `address` missed (its client sends them later), starting the retry loop if needed."""
        self._clients[address] = client
        pending = self._pending.setdefault(address, {})
        room = MAX_PENDING_IDS - len(self)
        dropped = 0
        for image_id in image_ids:
            if image_id not in pending:
                if room <= 0:
                    dropped += 1
                    continue
                room -= 1
            pending[image_id] = max(version, pending.get(image_id, 0))
        if dropped:
            REMOVAL_HINTS_DROPPED.inc(dropped)
            log.warning("%d stale-copy removals for %s dropped: %d already pending", dropped, address, len(self))
        PENDING_REMOVALS.set(len(self))
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="removal-hints")

    async def retry_once(self) -> int:
        """Send every pending removal once; returns how many went through."""
        done = 0
        for address, pending in list(self._pending.items()):
            client = self._clients[address]
            by_version: dict[int, list[str]] = {}
            for image_id, version in pending.items():
                by_version.setdefault(version, []).append(image_id)
            # One call per version (a removal carries one); the first failure ends this replica's round, so a
            # replica still down costs one call per round however much waits for it.
            calls = ((version, ids[start : start + RETRY_BATCH_IDS])
                     for version, ids in by_version.items() for start in range(0, len(ids), RETRY_BATCH_IDS))
            for version, batch in calls:
                try:
                    await client.delete(batch, timeout_s=self._timeout_s, version=version)
                except ImgsearchError:
                    break  # still down: next round
                for image_id in batch:
                    if pending.get(image_id) == version:  # not raised by a newer hint meanwhile
                        del pending[image_id]
                done += len(batch)
            if not pending:
                del self._pending[address]
        PENDING_REMOVALS.set(len(self))
        if done:
            log.info("stale-copy removals: %d sent again, %d pending", done, len(self))
        return done

    async def _run(self) -> None:
        while self._pending:
            await asyncio.sleep(self._interval_s)
            try:
                await self.retry_once()
            except Exception:  # the loop must survive anything
                log.exception("stale-copy removal round failed")

    async def stop(self) -> None:
        """Stop the retry loop, sending what is pending once more first (briefly: shutdown must not hang)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._pending:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.retry_once(), FLUSH_ON_STOP_S)
            if self._pending:
                log.warning("stopping with %d stale-copy removals unsent (their replicas still down)", len(self))
