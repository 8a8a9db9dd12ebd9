"""The broker's logic on plain data types: search (cache, embedding, fan-out), ingest, delete, stats.

Search flow: validate -> decode + hash (pHash, dHash) -> duplicate cache -> embed -> fan-out -> merge.

Duplicate-cache policy (see broker.cache for the Redis layout):
- *exact*: both 64-bit hashes equal a catalogue image's, and so do its colours (the hashes see brightness only:
  a product's recoloured variant has the same hashes) and its brightness (the hashes are of brightness
  differences: a flat grey picture has the hashes of a flat white one). Answered from the cache without an embedding call (two
  independent 64-bit hashes agreeing is a re-encode of the same picture in practice), so it still works while
  Triton is down.
- *near*: pHash and dHash both within 5 bits, same colours. The query is embedded and the match is trusted only
  when the cosine similarity with the stored embedding reaches `near_min_similarity`; otherwise the same
  embedding goes on to the vector search (no second embedding call).
- A cache answer lists the duplicates first, then fills top_k from the index with the query's embedding (for an
  exact match, the duplicate's stored embedding: still no embedding call).
- The cache answers only searches without an attribute filter (filters are defined and validated by the
  shards' attribute schema), and only with duplicates inside the requested categories.
- Redis down or slow: the lookup is skipped (outcome ERROR, counted) and the search goes to the index.
- Every cache answer is checked with the shards that own its images (one Get per shard, no embedding): an entry
  whose image the shard no longer holds as it was cached (deleted, re-ingested or moved while the cache write
  was lost: Redis down and the broker restarted before its repair queue caught up) is left out and removed.
  The answer carries the shard's current attributes. An entry whose shard cannot be asked is not answered
  (unchecked, it could be a deleted image's); when no entry survives, the search goes to the index as a miss
  would.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import time
from collections.abc import Iterable, Sequence

import numpy as np

from broker.cache import CacheEntry, CacheMatch, CacheOutOfTime, CacheUnavailable, DuplicateCache
from broker.decode_budget import PixelBudget, header_pixels
from broker.errors import InvalidRequestError, NoShardAvailableError, ShardTimeoutError
from broker.fanout import DELETE_BATCH_IDS, ShardPool
from broker.idlocks import ImageIdLocks
from broker.metrics import (
    CACHE_LOOKUPS,
    CACHE_STALE_ENTRIES,
    EMBED_REFUSED,
    PARTIAL_RESULTS,
    SEARCHES,
    STAGE_SECONDS,
    STAGES,
)
from broker.repair import CacheRepairQueue
from broker.types import (
    CacheOutcome,
    CatalogueItem,
    IngestSummary,
    Query,
    SearchAnswer,
    ShardReport,
    ShardSummary,
    StageTimings,
)
from broker.versions import WriteClock
from embedder.client import Embedder
from embedder.errors import EmbedderOverloadedError
from embedder.hashing import ImageHashes, hashes_of_bytes
from imgsearch.errors import ImgsearchError, quoted
from shard_server.errors import InvalidRequestError as ShardInvalidRequestError
from shard_server.types import MAX_ID_CHARS, Hit, Record, SearchQuery, distinct_products, normalised

log = logging.getLogger(__name__)

# Cache entries removed per Redis round trip by a Delete (see DuplicateCache.delete_many).
CACHE_DELETE_BATCH_IDS = 1_000
# Share of a search's remaining deadline kept back from the embedding call for the fan-out, capped.
FANOUT_RESERVE_FRACTION = 0.2
FANOUT_RESERVE_MAX_S = 0.1
# A cache entry is still current when its shard record has the same product and category and an embedding this
# close to the cached one (the same image gives the same embedding; other photos of one product reach ~0.93).
SAME_IMAGE_MIN_SIMILARITY = 0.99
# Cache matches checked with the shards per search (exact matches of one picture ingested under many ids).
MAX_CACHE_MATCHES_CHECKED = 64
# Longest a cache answer waits for its shards' check (a Get takes ~1-2 ms): a hung shard must not turn the
# cache's fastest answers into timeouts; its entries are then answered as cached, flagged partial.
CACHE_CHECK_MAX_S = 0.25
# An ingest's cache writes end this long before its deadline, leaving time for the answer to get back.
ANSWER_RESERVE_S = 0.02
# On shutdown, stale-entry removals still under way get this long (a lost one is found stale again later).
CLEANUP_WAIT_S = 1.0
# The stage histograms in StageTimings' field order, looked up once rather than by label on every search.
_STAGE_HISTOGRAMS = tuple(STAGE_SECONDS.labels(stage) for stage in STAGES)


class Broker:
    def __init__(
        self,
        *,
        pool: ShardPool,
        embedder: Embedder,
        cache: DuplicateCache | None,
        repair: CacheRepairQueue | None,
        dimension: int = 512,
        max_top_k: int = 1000,
        max_image_bytes: int,
        max_image_pixels: int,
        max_decoding_pixels: int | None = None,
        near_min_similarity: float = 0.82,
    ):
        self.pool = pool
        self.embedder = embedder
        self.cache = cache
        self.repair = repair
        self._image_id_locks = ImageIdLocks()
        self._write_clock = WriteClock()
        self.dimension = dimension
        self.max_top_k = max_top_k
        self.max_image_bytes = max_image_bytes
        self.max_image_pixels = max_image_pixels
        self._decoding = PixelBudget(max_decoding_pixels or max_image_pixels)
        self.near_min_similarity = near_min_similarity
        self._cleanups: set[asyncio.Task] = set()  # removals of stale cache entries found by searches

    async def close(self) -> None:
        """Waits briefly for the stale-entry removals under way (each is bounded by the cache's write timeout)."""
        if self._cleanups:
            await asyncio.wait(set(self._cleanups), timeout=CLEANUP_WAIT_S)
        left = set(self._cleanups)
        for task in left:
            task.cancel()
        await asyncio.gather(*left, return_exceptions=True)

    # ------------------------------------------------------------------ search
    async def search(self, query: Query, *, timeout_s: float) -> SearchAnswer:
        t_start = time.perf_counter()
        deadline = time.monotonic() + timeout_s
        if not 1 <= query.top_k <= self.max_top_k:
            raise InvalidRequestError(f"top_k must be in 1..{self.max_top_k}, got {query.top_k}")
        if not all(query.categories):  # checked here, not only by the shards: a cache answer never asks them
            raise InvalidRequestError("empty category name in search request")
        decode_s = cache_s = embed_s = 0.0
        outcome = CacheOutcome.NOT_USED
        near: list[CacheMatch] = []
        source: Record | None = None  # the catalogue image of a search by image id, left out of its hits
        if query.vector is not None:
            vector = self._checked_vector(query.vector, "query")
        elif query.image_id is not None:
            if not query.image_id or len(query.image_id) > MAX_ID_CHARS:
                raise InvalidRequestError(
                    f"image_id must be a non-empty string of at most {MAX_ID_CHARS} characters"
                )
            source = await self.pool.get(query.image_id, timeout_s=max(0.0, deadline - time.monotonic()))
            vector = self._checked_vector(source.vector, "stored")
        elif query.image is not None:
            t0 = time.perf_counter()
            hashes = await self._hashed(query.image, deadline)
            decode_s = time.perf_counter() - t0
            vector = None
            if self.cache is not None and query.use_duplicate_cache and not query.filter:
                t0 = time.perf_counter()
                outcome, exact, near = await self._lookup(hashes, query.categories, deadline)
                # the shards' check of an exact match counts as the cache stage (a near match's, after embedding)
                hits, partial = (
                    await self._current(query, [(m.entry, 1.0) for m in exact], deadline) if exact else ((), False)
                )
                cache_s = time.perf_counter() - t0
                if exact:
                    if hits:
                        CACHE_LOOKUPS.labels("hit").inc()
                        # the rest of top_k from the index, around the duplicate's stored embedding: no Triton call
                        stored = {m.entry.image_id: m.entry.embedding for m in exact}
                        return await self._cache_answer(
                            query, hits, stored[hits[0].image_id], CacheOutcome.EXACT, deadline,
                            StageTimings(decode_hash_s=decode_s, cache_s=cache_s), t_start, partial=partial,
                        )
                    outcome = CacheOutcome.MISS  # every exact match was stale
                    CACHE_LOOKUPS.labels("miss").inc()
            t0 = time.perf_counter()
            # Keep part of the deadline for the fan-out: a slow Triton should not leave the shards no time.
            fanout_reserve_s = min(
                FANOUT_RESERVE_MAX_S, FANOUT_RESERVE_FRACTION * (deadline - time.monotonic())
            )
            vector = await self._embed_one(query.image, deadline - fanout_reserve_s)
            embed_s = time.perf_counter() - t0
            if near:
                scored = sorted(
                    ((float(np.dot(m.entry.embedding, vector)), m) for m in near), key=lambda sm: -sm[0]
                )
                confirmed = [(m.entry, s) for s, m in scored if s >= self.near_min_similarity]
                hits, partial = await self._current(query, confirmed, deadline) if confirmed else ((), False)
                if hits:
                    return await self._cache_answer(
                        query, hits, vector, CacheOutcome.NEAR, deadline,
                        StageTimings(decode_hash_s=decode_s, cache_s=cache_s, embed_s=embed_s), t_start,
                        partial=partial,
                    )
                outcome = CacheOutcome.MISS
                CACHE_LOOKUPS.labels("miss").inc()
        else:
            raise InvalidRequestError("a search needs an image, a vector or an image id")

        # one more for a search by image id: the image itself (or its product) is taken out below
        # (the shards' limit is one above the broker's, ShardConfig.max_top_k)
        shard_query = _shard_query(query, vector, top_k=query.top_k + 1 if source is not None else query.top_k)
        result = await self.pool.search(shard_query, timeout_s=max(0.0, deadline - time.monotonic()))
        hits = result.hits
        if source is not None:
            hits = tuple(
                h
                for h in hits
                if h.image_id != source.image_id
                and not (query.distinct_products and h.product_id == source.product_id)
            )[: query.top_k]
        total_s = time.perf_counter() - t_start
        timings = StageTimings(
            decode_hash_s=decode_s,
            cache_s=cache_s,
            embed_s=embed_s,
            fanout_s=result.fanout_s,
            merge_s=result.merge_s,
            total_s=total_s,
        )
        self._observe(timings)
        SEARCHES.labels(
            "index", "image_id" if source is not None else "vector" if query.image is None else "image"
        ).inc()
        return SearchAnswer(
            hits=hits,
            cache=outcome,
            from_duplicate_cache=False,
            partial=result.partial,
            shards=_shard_reports(result.answers),
            timings=timings,
        )

    async def _current(
        self, query: Query, matches: Sequence[tuple[CacheEntry, float]], deadline: float
    ) -> tuple[tuple[Hit, ...], bool]:
        """The cache's answer (best first, top_k) from the entries that the owning shards still hold as cached,
        with the shards' current attributes, and whether it is partial (an entry's shard could not be asked).
        Stale entries are removed from the cache. An entry whose shard could not be asked is left out (not
        removed): unchecked, it could answer for an image deleted while Redis was down (a cache delete the broker
        kept for later and lost in a restart); when nothing is left, the index search that follows answers
        without that shard, flagged partial too."""
        matches = matches[: max(query.top_k, MAX_CACHE_MATCHES_CHECKED)]
        try:
            stored, unasked = await self.pool.stored(
                {entry.image_id: entry.category for entry, _ in matches},
                timeout_s=min(CACHE_CHECK_MAX_S, max(0.0, deadline - time.monotonic())),
            )
        except ImgsearchError as exc:  # the request itself (a shard refused it): not the cache's to answer
            log.debug("cache answer not checked, searching the index: %s", exc)
            return (), False
        current: list[Hit] = []
        stale: list[str] = []
        for entry, score in matches:
            record = stored.get(entry.image_id)
            if entry.image_id in unasked:
                continue  # not confirmed: not answered
            if (
                record is None
                or record.product_id != entry.product_id
                or record.category != entry.category
                or float(np.dot(record.vector, entry.embedding)) < SAME_IMAGE_MIN_SIMILARITY
            ):
                stale.append(entry.image_id)
                continue
            current.append(
                Hit(image_id=record.image_id, product_id=record.product_id, category=record.category,
                    score=score, attributes=dict(record.attributes), version=record.version)
            )
        if stale:
            CACHE_STALE_ENTRIES.inc(len(stale))
            log.info("removing %d stale duplicate-cache entries: %s", len(stale), stale[:5])
            # Straight to Redis, not through _write_cache: a success there would also discard a pending repair
            # of the same id (the new entry of a re-ingest whose cache write failed). A failure only leaves the
            # entry to be found stale again.
            # Only if still the entry found stale: a re-ingest may have written the id's new entry meanwhile.
            # In the background: tidying up is no part of this search's answer, and a slow Redis held the search
            # for up to the 1 s write timeout, past its own deadline (review of 2026-12-05).
            task = asyncio.create_task(
                self._remove_stale([entry for entry, _ in matches if entry.image_id in stale]))
            self._cleanups.add(task)
            task.add_done_callback(self._cleanups.discard)
        return _first(query, current), any(entry.image_id in unasked for entry, _ in matches)

    async def _remove_stale(self, entries: list[CacheEntry]) -> None:
        with contextlib.suppress(CacheUnavailable):
            await self.cache.delete_stale(entries)

    async def _lookup(
        self, hashes: ImageHashes, categories: Sequence[str], deadline: float
    ) -> tuple[CacheOutcome, list[CacheMatch], list[CacheMatch]]:
        try:
            matches = await self.cache.lookup(hashes.phash, hashes.dhash, hashes.colour,
                                              brightness=hashes.brightness, deadline=deadline)
        except CacheUnavailable as exc:
            log.debug("cache bypassed: %s", exc)
            # A search whose own deadline cut the lookup short says nothing of Redis: counted as an error, it
            # could page "Redis is down or slow" (ImgsearchCacheErrors) when the broker itself is overloaded.
            CACHE_LOOKUPS.labels("out_of_time" if isinstance(exc, CacheOutOfTime) else "error").inc()
            return CacheOutcome.ERROR, [], []
        if categories:
            wanted = set(categories)
            matches = [m for m in matches if m.entry.category in wanted]
        exact = [m for m in matches if m.exact]
        if exact:  # counted once the shards have confirmed it (hit) or not (miss)
            return CacheOutcome.EXACT, exact, []
        near = [m for m in matches if not m.exact]
        if not near:
            CACHE_LOOKUPS.labels("miss").inc()
            return CacheOutcome.MISS, [], []
        # counted once the embedding has confirmed it (near_hit) or not (miss)
        return CacheOutcome.MISS, [], near

    async def _cache_answer(
        self, query: Query, duplicates: tuple[Hit, ...], vector: np.ndarray, outcome: CacheOutcome,
        deadline: float, timings: StageTimings, t_start: float, *, partial: bool,
    ) -> SearchAnswer:
        """The duplicates first, then, when they do not fill top_k, the index's nearest to `vector` (the query's
        embedding, or an exact duplicate's stored one). A cache answer used to hold the duplicates alone: a search
        for 10 similar products with a catalogue photo got 1. If the index cannot be searched, the duplicates
        are answered alone, flagged partial."""
        if outcome is CacheOutcome.NEAR:
            CACHE_LOOKUPS.labels("near_hit").inc()
        hits, shards, fanout_s, merge_s, counted = duplicates, (), 0.0, 0.0, False
        if len(duplicates) < query.top_k:
            # the duplicates are among the index's nearest too, and are left out of its part (no filter: a
            # filtered search never reaches the cache)
            shard_query = _shard_query(query, vector, top_k=min(query.top_k + len(duplicates), self.max_top_k + 1))
            try:
                result = await self.pool.search(shard_query, timeout_s=max(0.0, deadline - time.monotonic()))
            except (NoShardAvailableError, ShardTimeoutError) as exc:
                log.debug("cache answer not completed from the index: %s", exc)
                partial = True
            else:
                seen = {hit.image_id for hit in duplicates}
                hits = _first(query, [*duplicates, *(hit for hit in result.hits if hit.image_id not in seen)])
                if result.partial:  # counted by the pool's search already
                    partial, counted = True, True
                shards = _shard_reports(result.answers)
                fanout_s, merge_s = result.fanout_s, result.merge_s
        if partial and not counted:
            PARTIAL_RESULTS.inc()
        timings = dataclasses.replace(timings, fanout_s=fanout_s, merge_s=merge_s,
                                      total_s=time.perf_counter() - t_start)
        self._observe(timings)
        SEARCHES.labels("cache", "image").inc()
        return SearchAnswer(
            hits=hits, cache=outcome, from_duplicate_cache=True, partial=partial, shards=shards, timings=timings
        )

    @staticmethod
    def _observe(t: StageTimings) -> None:
        for histogram, value in zip(
            _STAGE_HISTOGRAMS, (t.decode_hash_s, t.cache_s, t.embed_s, t.fanout_s, t.merge_s, t.total_s)
        ):
            if value > 0:
                histogram.observe(value)

    # ------------------------------------------------------------------ ingest
    async def ingest(self, items: Sequence[CatalogueItem], *, timeout_s: float) -> IngestSummary:
        """Embed, write to the owning shards (durable), then the cache entries. Idempotent by image id."""
        deadline = time.monotonic() + timeout_s
        for item in items:
            _check_item(item)
        acknowledged = len(items)
        # One write per image id, the last item of an id winning (as inside a shard): two items of one id would
        # otherwise be written to two shards and then removed from both as each other's "former shard", and
        # their concurrent cache writes could leave the first item's entry while the shard keeps the last.
        items = list({item.image_id: item for item in items}.values())
        images = [i for i, item in enumerate(items) if item.image is not None]
        hashes: dict[int, ImageHashes] = {}
        vectors: dict[int, np.ndarray] = {}
        if images:
            hashes = {i: await self._hashed(items[i].image, deadline, image_id=items[i].image_id) for i in images}
            # Bulk: an ingest waits behind searches for the model, never the other way round.
            embedded = await self._embed([items[i].image for i in images], deadline, bulk=True)
            vectors.update(zip(images, embedded))
        for i, item in enumerate(items):
            if item.image is None:
                vectors[i] = self._checked_vector(item.vector, f"item {item.image_id!r}")
        # One write of an id at a time (broker.idlocks): the shard write, the removal from other shards and the
        # cache entry of a later ingest must not interleave with an earlier one's. The version is taken inside,
        # so that within this broker the order the writes take turns in is the order of their versions.
        async with self._image_id_locks.hold([item.image_id for item in items],
                                             timeout_s=max(0.0, deadline - time.monotonic())):
            version = self._write_clock.next()
            records = [
                Record(
                    image_id=item.image_id,
                    product_id=item.product_id,
                    category=item.category,
                    vector=vectors[i],
                    attributes=dict(item.attributes),
                    version=version,
                )
                for i, item in enumerate(items)
            ]
            writes = _cache_writes(items, hashes, vectors, version) if self.cache is not None else []
            try:
                await self.pool.upsert(records, timeout_s=max(0.0, deadline - time.monotonic()))
            except asyncio.CancelledError:
                # The caller hung up: the records may have reached the shards, so their cache writes are queued
                # (review of 2026-12-05: nothing was). An entry of a record that did not is found stale by the
                # first search it would answer, and removed.
                if self.repair is not None:
                    for image_id, entry in writes:
                        self.repair.add(image_id, entry)
                raise
            # The shards hold it durably now: the ingest succeeds whatever the cache does. Its writes end before
            # the caller's deadline; those not done by then are left to the repair queue (a slow Redis failed
            # with DEADLINE_EXCEEDED ingests that the shards had written, and queued no repair: review).
            pending = await self._write_cache(writes, deadline - ANSWER_RESERVE_S, written=True) if writes else 0
        return IngestSummary(ingested=acknowledged, cache_pending=pending)

    async def delete(self, image_ids: Sequence[str], *, timeout_s: float) -> int:
        for image_id in image_ids:
            if not image_id or len(image_id) > MAX_ID_CHARS:
                raise InvalidRequestError("image ids must be non-empty strings of at most 512 characters")
        # Cache first: a delete that then fails on a shard must not leave the cache answering with the image
        # (a missing cache entry only costs an index search; the caller retries the delete, idempotent).
        deadline = time.monotonic() + timeout_s
        deleted = 0
        # Batch by batch (as the shards get them), so that holding a huge Delete's ids does not stall the loop; a
        # failure part-way leaves earlier batches deleted, and retrying is safe.
        for start in range(0, len(image_ids), DELETE_BATCH_IDS):
            batch = list(image_ids[start : start + DELETE_BATCH_IDS])
            async with self._image_id_locks.hold(batch, timeout_s=max(0.0, deadline - time.monotonic())):
                if self.cache is not None:
                    # at most half the time left: the shards' delete needs the rest
                    now = time.monotonic()
                    await self._write_cache([(image_id, None) for image_id in batch], now + (deadline - now) / 2,
                                            written=False)
                deleted += await self.pool.delete(batch, timeout_s=max(0.0, deadline - time.monotonic()),
                                                  version=self._write_clock.next())
        return deleted

    async def _write_cache(self, writes: list[tuple[str, CacheEntry | None]], deadline: float, *,
                           written: bool) -> int:
        """Apply cache upserts (entry) and deletes (None: a Delete, or a vector-only re-ingest dropping an old
        image entry) by `deadline` (time.monotonic()); failed or unfinished ones go to the repair queue. Returns
        how many failed. Deletes go in batches of CACHE_DELETE_BATCH_IDS per round trip, so a bulk Delete does not
        run a Redis call per id.

        `written`: the shards already hold what these writes reflect (an ingest's, after its shard write). Then a
        caller that hangs up meanwhile leaves every write not yet done to the repair queue. Before the shards (a
        Delete clears the cache first), the writes not yet done when it hangs up are left out of the queue: the
        shards deleted nothing, and queueing them replaced the images' pending upserts with deletes (review of
        2026-12-05). The writes done or failed before it were settled as usual, so a Delete that does not reach
        the shards can still leave an image's cache entry missing: a cache miss later, never a stale answer."""
        done: set[str] = set()

        def settled(batch: Sequence[tuple[str, CacheEntry | None]], ok: bool) -> int:
            done.update(image_id for image_id, _ in batch)
            if self.repair is not None:
                for image_id, entry in batch:
                    if ok:
                        self.repair.discard(image_id)
                    else:
                        self.repair.add(image_id, entry)
            return 0 if ok else len(batch)

        async def upsert(image_id: str, entry: CacheEntry) -> int:
            try:
                await self.cache.upsert(entry, deadline=deadline)
            except CacheUnavailable:
                return settled([(image_id, entry)], False)
            return settled([(image_id, entry)], True)

        async def delete(batch: list[tuple[str, None]]) -> int:
            try:
                await self.cache.delete_many([image_id for image_id, _ in batch], deadline=deadline)
            except CacheUnavailable:
                return settled(batch, False)
            return settled(batch, True)

        try:
            failed = sum(
                await asyncio.gather(
                    *(upsert(image_id, entry) for image_id, entry in writes if entry is not None)
                )
            )
            deletes = [(image_id, None) for image_id, entry in writes if entry is None]
            # one batch at a time, so a bulk Delete holds one Redis connection
            for start in range(0, len(deletes), CACHE_DELETE_BATCH_IDS):
                failed += await delete(deletes[start : start + CACHE_DELETE_BATCH_IDS])
        except asyncio.CancelledError:
            if written:
                settled([(image_id, entry) for image_id, entry in writes if image_id not in done], False)
            raise
        return failed

    # ------------------------------------------------------------------ stats
    async def stats(self, *, timeout_s: float) -> list[ShardSummary]:
        replicas = await self.pool.stats(timeout_s=timeout_s)
        return [
            ShardSummary(
                shard=r.shard,
                address=r.address,
                reachable=r.stats is not None,
                categories=tuple(r.stats.categories) if r.stats is not None else (),
            )
            for r in replicas
        ]

    # ------------------------------------------------------------------ helpers
    async def _hashed(self, data: bytes, deadline: float, *, image_id: str | None = None) -> ImageHashes:
        """The image's hashes, decoded on a thread once the decoding budget has room (broker.decode_budget). An
        item's bad image fails with its image id in the message (same status code)."""
        try:
            # On the thread too: Pillow inflates a PNG's text chunks while reading its header (a 65 KB upload
            # with 63 zTXt chunks took 0.2 s).
            pixels = await asyncio.to_thread(header_pixels, data) if len(data) <= self.max_image_bytes else 0
            if not 0 < pixels <= self.max_image_pixels:
                # Nothing to hold: unreadable, or over a limit the decoder refuses from the header at once.
                return await asyncio.to_thread(self._hash, data)
            async with self._decoding.hold(pixels, timeout_s=max(0.0, deadline - time.monotonic())):
                decoding = asyncio.ensure_future(asyncio.to_thread(self._hash, data))
                try:
                    return await asyncio.shield(decoding)
                except asyncio.CancelledError:
                    # The caller is gone (its deadline, or it hung up) but the thread decodes on: its pixels
                    # stay held until it is done, or cancelled callers would decode any number of images at once.
                    with contextlib.suppress(Exception):
                        await decoding
                    raise
        except ImgsearchError as exc:
            if image_id is None:
                raise
            renamed = type(exc)(f"item {image_id!r}: {exc}")
            raise renamed from exc

    def _hash(self, data: bytes) -> ImageHashes:
        return hashes_of_bytes(data, max_image_bytes=self.max_image_bytes, max_image_pixels=self.max_image_pixels)

    async def _embed_one(self, image: bytes, deadline: float) -> np.ndarray:
        return (await self._embed([image], deadline))[0]

    async def _embed(self, images: list[bytes], deadline: float, *, bulk: bool = False) -> np.ndarray:
        try:
            vectors = await self.embedder.embed(images, timeout_s=max(0.001, deadline - time.monotonic()),
                                                bulk=bulk)
        except EmbedderOverloadedError:
            EMBED_REFUSED.labels("ingest" if bulk else "search").inc()
            raise
        return np.asarray(vectors, dtype=np.float32)

    def _checked_vector(self, vector: np.ndarray, what: str) -> np.ndarray:
        """The shard tier's check and normalisation, failing with the broker's own error type."""
        try:
            return normalised(vector, self.dimension, what)
        except ShardInvalidRequestError as exc:
            raise InvalidRequestError(str(exc)) from None


def _cache_writes(items: Sequence[CatalogueItem], hashes: dict[int, ImageHashes], vectors: dict[int, np.ndarray],
                  version: int) -> list[tuple[str, CacheEntry | None]]:
    """An ingest's cache writes: each image item's entry, and None (a delete of its old entry) for a vector item."""
    return [
        (
            item.image_id,
            CacheEntry(
                image_id=item.image_id,
                product_id=item.product_id,
                category=item.category,
                phash=hashes[i].phash,
                dhash=hashes[i].dhash,
                colour=hashes[i].colour,
                brightness=hashes[i].brightness,
                embedding=vectors[i],
                attributes=dict(item.attributes),
                version=version,
            )
            if i in hashes
            else None,
        )
        for i, item in enumerate(items)
    ]


def _check_item(item: CatalogueItem) -> None:
    for name in ("image_id", "product_id", "category"):
        value = getattr(item, name)
        if not value or not value.strip() or len(value) > MAX_ID_CHARS:  # " " was stored as a category (review)
            raise InvalidRequestError(
                f"{name} must be a string of 1 to {MAX_ID_CHARS} characters, not only spaces "
                f"(item {quoted(item.image_id)})"
            )
    if (item.image is None) == (item.vector is None):
        raise InvalidRequestError(f"item {item.image_id!r} needs exactly one of image or vector")


def _shard_query(query: Query, vector: np.ndarray, *, top_k: int) -> SearchQuery:
    return SearchQuery(vector=vector, top_k=top_k, categories=tuple(query.categories), filter=query.filter,
                       nprobe=query.nprobe, exactness=query.exactness, distinct_products=query.distinct_products)


def _shard_reports(answers) -> tuple[ShardReport, ...]:
    return tuple(ShardReport(shard=a.shard, address=a.address, outcome=a.outcome, message=a.message)
                 for a in answers)


def _first(query: Query, hits: Iterable[Hit]) -> tuple[Hit, ...]:
    """The first top_k of cache hits (best first), one per product when the query asks for distinct products."""
    if query.distinct_products:
        hits = distinct_products(hits)
    return tuple(itertools.islice(hits, query.top_k))
