"""Stale-copy removals that a shard replica missed, kept by the broker and retried until the replica takes them.

An ingest that moves an image to a category of another shard removes the id from the shard it left. A replica
that is down then keeps the old copy: the ingest fails (UNAVAILABLE), but its retry succeeds without that replica
(the replicas that answered hold nothing to remove any more), and the copy came back with the replica. Each
missed removal is kept here per replica address and sent again every `interval_s` until it goes through.

The removal is versioned (broker/versions.py): it takes only copies written before the ingest, so sending it late,
twice, or from two brokers never removes a newer write of the id. With Redis configured, the removals are also
kept there (broker/hint_journal.py) before the ingest is answered, and every broker loads the journal's removals
for its replicas every `reload_interval_s`: a broker that stops or crashes while a replica is still down leaves
them to the others, or to itself once restarted. Without Redis, or while Redis is down (the removal is then saved
by a later round), they live in the broker's memory only, and a copy whose removal was lost with a broker stays
until its id is written again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable, Mapping

from broker.background import stop_task
from broker.hint_journal import HintJournal, JournalUnavailable
from broker.metrics import PENDING_REMOVALS, REMOVAL_HINTS_DROPPED, UNSAVED_REMOVALS
from imgsearch.errors import ImgsearchError

log = logging.getLogger(__name__)

# Ids per Delete call of a retry round (the shards accept 10,000 per request).
RETRY_BATCH_IDS = 1_000
# Removals kept at most, over all replicas (~150 bytes each): a shard down for long while every ingest hints all of
# its ids to it must not grow the broker without bound. Past it, new ones are dropped, logged and counted.
MAX_PENDING_IDS = 200_000
# On a graceful stop, what is pending is sent once more, for at most this long.
FLUSH_ON_STOP_S = 2.0
# An ingest waits at most this long for its removals to be saved to the journal; a slow Redis leaves the rest to
# the retry loop, so it does not hold up every ingest while a shard is down.
SAVE_ON_INGEST_MAX_S = 0.25


class RemovalHints:
    def __init__(self, clients: Mapping[str, object], *, journal: HintJournal | None = None,
                 interval_s: float = 1.0, reload_interval_s: float = 10.0, timeout_s: float = 2.0):
        """`clients`: replica address -> its ShardClient, for every replica this broker writes to."""
        self._clients = dict(clients)
        self._journal = journal
        self._interval_s = interval_s
        self._reload_interval_s = reload_interval_s
        self._timeout_s = timeout_s
        self._pending: dict[str, dict[str, int]] = {}  # replica address -> image id -> removal version
        self._unsaved: dict[str, dict[str, int]] = {}  # the part of _pending not yet in the journal
        self._next_reload = 0.0
        self._task: asyncio.Task | None = None

    def __len__(self) -> int:
        return sum(map(len, self._pending.values()))

    def start(self) -> None:
        """Start the retry loop now (with a journal it runs for good: other brokers' removals turn up there)."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="removal-hints")

    async def add(self, address: str, image_ids: Iterable[str], version: int, *, timeout_s: float = 1.0) -> None:
        """Remember removals `address` missed and save them to the journal (for at most `timeout_s`: what is not
        saved by then is saved by the retry loop), starting the retry loop if needed."""
        added = self._keep(address, {image_id: version for image_id in image_ids})
        if added and self._journal is not None:
            try:
                async with asyncio.timeout(min(timeout_s, SAVE_ON_INGEST_MAX_S)):  # not wait_for (hint_journal)
                    await self._journal.save(address, added)
            except (JournalUnavailable, TimeoutError) as exc:
                self._unsaved.setdefault(address, {}).update(added)
                log.warning("%d stale-copy removals for %s kept in memory only for now: %r", len(added), address,
                            exc)
        self._set_gauges()
        self.start()

    def _keep(self, address: str, removals: Mapping[str, int], *, count_dropped: bool = True) -> dict[str, int]:
        """Merge removals into what is pending (highest version per id, up to the cap); those taken. Those over
        the cap are dropped and counted, unless they come from the journal (they stay there)."""
        pending = self._pending.setdefault(address, {})
        room = MAX_PENDING_IDS - len(self)
        taken: dict[str, int] = {}
        dropped = 0
        for image_id, version in removals.items():
            if image_id not in pending:
                if room <= 0:
                    dropped += 1
                    continue
                room -= 1
            elif pending[image_id] >= version:
                continue
            pending[image_id] = taken[image_id] = version
        if not pending:
            del self._pending[address]
        if dropped and count_dropped:
            REMOVAL_HINTS_DROPPED.inc(dropped)
            log.warning("%d stale-copy removals for %s dropped: %d already pending", dropped, address, len(self))
        return taken

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
                sent = {image_id: version for image_id in batch if pending.get(image_id) == version}
                for image_id in sent:  # those not raised by a newer removal meanwhile
                    del pending[image_id]
                    unsaved = self._unsaved.get(address, {})
                    if unsaved.get(image_id) == version:
                        del unsaved[image_id]
                done += len(batch)
                if self._journal is not None:
                    with contextlib.suppress(JournalUnavailable):  # kept there: sent again later, harmlessly
                        await self._journal.forget(address, sent)
            if not pending:
                self._pending.pop(address, None)
            if not self._unsaved.get(address, True):
                del self._unsaved[address]
        self._set_gauges()
        if done:
            log.info("stale-copy removals: %d sent again, %d pending", done, len(self))
        return done

    async def sync_journal(self) -> None:
        """Save what could not be saved before, and take up the journal's removals for this broker's replicas
        (those another broker, or this one before a restart, left there). Raises JournalUnavailable."""
        if self._journal is None:
            return
        for address in list(self._unsaved):
            unsaved = self._unsaved.pop(address)  # an ingest's failed save meanwhile starts a new dict
            try:
                await self._journal.save(address, unsaved)
            except BaseException:
                pending = self._pending.get(address, {})
                back = self._unsaved.setdefault(address, {})
                for image_id, version in unsaved.items():
                    if pending.get(image_id) == version and back.get(image_id, -1) < version:  # still unsent
                        back[image_id] = version
                raise
            finally:
                self._set_gauges()
        if time.monotonic() >= self._next_reload:
            self._next_reload = time.monotonic() + self._reload_interval_s  # a failed load waits its turn too
            for address, size in (await self._journal.sizes(self._clients)).items():
                held = len(self._pending.get(address, ()))
                if size <= held:
                    continue  # nothing this broker is not sending already (or not yet: it will be once it is)
                room = MAX_PENDING_IDS - len(self)
                if room <= 0:
                    break  # the rest stays in the journal for later rounds
                self._keep(address, await self._journal.load(address, limit=held + room), count_dropped=False)
        self._set_gauges()

    def _set_gauges(self) -> None:
        PENDING_REMOVALS.set(len(self))
        UNSAVED_REMOVALS.set(sum(map(len, self._unsaved.values())))

    async def _run(self) -> None:
        while self._pending or self._journal is not None:
            try:
                await self.sync_journal()
            except JournalUnavailable as exc:
                log.debug("removal journal not reachable: %s", exc)
            except Exception:  # the loop must survive anything
                log.exception("removal journal round failed")
            try:
                if self._pending:
                    await self.retry_once()
            except Exception:
                log.exception("stale-copy removal round failed")
            await asyncio.sleep(self._interval_s)

    async def stop(self) -> None:
        """Stop the retry loop, sending what is pending once more first (briefly: shutdown must not hang)."""
        if self._task is not None:
            await stop_task(self._task)
            self._task = None
        if not self._pending:
            return
        with contextlib.suppress(Exception):
            async with asyncio.timeout(FLUSH_ON_STOP_S):
                await self.retry_once()
        if self._unsaved and self._journal is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(FLUSH_ON_STOP_S):
                    await self.sync_journal()
        if self._pending:
            unsaved = sum(map(len, self._unsaved.values())) if self._journal is not None else len(self)
            log.warning("stopping with %d stale-copy removals unsent (their replicas still down); %d of them are "
                        "lost with this broker (not in the Redis journal)", len(self), unsaved)
