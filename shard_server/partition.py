"""One category's vectors: exact search while small, IVF-PQ (trained in the background) once big enough.

Rows are append-only: a row number is the faiss id, an index into the exact vectors, the attribute columns and
the id lists. Upserting an existing image appends a new row and tombstones the old one (``alive``), both under
one write lock; tombstoned rows are removed from the IVF index at once and excluded from every exact scan. Once
tombstoned rows are as many as live ones (a catalogue re-ingested to update its prices leaves one per image),
the engine replaces the partition with a compacted copy of its live rows (`compacted_copy`, `catch_up`).

Concurrency: searches hold the read side of ``lock``; writes (applied one at a time by the engine) and the
final swap of a freshly trained index hold the write side, briefly. Training itself runs without the lock on
copies, then catches up with rows written meanwhile, so searches never wait on training.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from operator import itemgetter

import faiss
import numpy as np

from shard_server import metrics
from shard_server.attributes import AttributeColumns
from shard_server.columns import GrowableArray, StringColumn
from shard_server.config import ShardConfig
from shard_server.rwlock import ReadWriteLock
from shard_server.types import SCORE_TIE_DECIMALS, AnyOf, Filter, first_of_each, rounded_scores
from shard_server.vectors import VectorStore

log = logging.getLogger(__name__)

ADD_CHUNK_ROWS = 65_536
CATCH_UP_UNDER_LOCK_ROWS = 1_024
MASK_CACHE_SIZE = 64
# Filters listing more any_of values than this are not cached (shops' filters list a few brands or colours).
MASK_CACHE_MAX_FILTER_VALUES = 256
# A distinct-products search that finds fewer than top_k products among its re-ranked candidates asks the index
# for this many times more, up to DISTINCT_MAX_CANDIDATES_FACTOR x max_rerank_candidates.
DISTINCT_WIDEN_FACTOR = 4
DISTINCT_MAX_CANDIDATES_FACTOR = 16
# A partition is compacted once its tombstoned rows are at least this many and at least as many as its live ones:
# they cost memory, snapshot bytes and restart time, and every exact scan scores them (a catalogue of 4,000
# images re-ingested 10 times: 44,000 rows, searches 0.7 -> 6.8 ms, a 92 MB snapshot for 8 MB of vectors).
COMPACT_MIN_DEAD_ROWS = 1_000
# Rows a compaction copies per hold of the source's read lock (~4 MB of 512-d float32 vectors: a few ms).
COPY_CHUNK_ROWS = 2_048


class ExactScanTooLong(Exception):
    """A search would score more rows one by one than its caller allows (see Partition.search)."""


def _check_exact_rows(rows: int, limit: int | None) -> None:
    if limit is not None and rows > limit:
        raise ExactScanTooLong(f"{rows} rows to score one by one; the limit is {limit}")


@dataclass(frozen=True, kw_only=True)
class PartitionHits:
    rows: np.ndarray  # int64, best first
    scores: np.ndarray  # float32
    candidates_scanned: int
    strategy: str
    details: list[tuple[str, str, dict, int]] | None = None  # (image id, product id, attributes, version) per row


@dataclass(frozen=True, kw_only=True)
class _Selection:
    mask: np.ndarray  # bool over rows [0, n): alive and matching the filter
    count: int
    bitmap: np.ndarray  # the mask packed little-endian for faiss.IDSelectorBitmap


class Partition:
    def __init__(self, name: str, config: ShardConfig):
        self.name = name
        self.config = config
        self.lock = ReadWriteLock()
        self.vectors = VectorStore(config.dimension, dtype=config.vector_dtype)
        self.attributes = AttributeColumns(config.attribute_kinds)
        self.alive = GrowableArray(np.bool_)
        self.versions = GrowableArray(np.uint64)  # each row's write version (VectorRecord.version; 0: none)
        # Not lists: the garbage collector would walk every id on each full collection (see StringColumn).
        self.image_ids = StringColumn()
        self.product_ids = StringColumn()
        self.live_count = 0
        self.version = 0  # bumped by every write; keys the filter-mask cache
        # Exact mode scans the rows with BLAS: in place when they are float32, through this float32 mirror when
        # they are stored as float16 (converting every row on every query is far slower). IVF mode: the index.
        self._exact = self.exact_mirror()
        self.ivf: faiss.Index | None = None
        self.nlist = 0
        self.trained_at_rows = 0
        self._masks: OrderedDict[tuple[Filter, int], _Selection] = OrderedDict()
        self._masks_lock = threading.Lock()
        self.training_failed_at_rows = -1
        self.source_rows_seen = 0  # a compacted copy (compacted_copy): the rows of its source it has looked at

    def exact_mirror(self, initial: np.ndarray | None = None) -> GrowableArray | None:
        """A float32 copy of the rows for exact scans, or None where the stored rows are float32 already."""
        if self.vectors.all_float32:
            return None
        return GrowableArray(np.float32, row_shape=(self.config.dimension,),
                             initial=None if initial is None else np.asarray(initial, dtype=np.float32))

    # --- writes (engine applies them one at a time) ----------------------------------------------------------
    def reserve(self, extra_rows: int) -> None:
        """Room for a bulk write's rows in the vector store (nearly all of a row's bytes), allocated once."""
        with self.lock.write():
            self.vectors.reserve(extra_rows)
            if self.ivf is None and self._exact is not None:
                self._exact.reserve(extra_rows)

    def append(self, image_ids: list[str], product_ids: list[str], vectors: np.ndarray,
               attributes: list, versions: list[int] | None = None, *,
               replacing: np.ndarray | None = None) -> np.ndarray:
        """Append rows; `replacing`: rows of the same images to tombstone in the same step, so that a search sees
        an image's old row or its new one, never neither (a re-ingested image was missing from 1 in 25,000
        searches, review)."""
        with self.lock.write():
            if replacing is not None and len(replacing):
                self._tombstone(np.asarray(replacing, dtype=np.int64))
            self.attributes.append(attributes)
            return self._append_rows(vectors, versions if versions is not None else np.zeros(len(image_ids)),
                                     image_ids, map(sys.intern, product_ids))  # several images share a product id

    def _append_rows(self, vectors: np.ndarray, versions, image_ids, product_ids) -> np.ndarray:
        """Append rows (all but their attributes, which the caller appends); the caller holds the write lock."""
        start = len(self.image_ids)
        rows = np.arange(start, start + len(vectors), dtype=np.int64)
        self.vectors.append(vectors)
        if self.ivf is not None:
            self.ivf.add_with_ids(vectors, rows)
        elif self._exact is not None:
            self._exact.extend(vectors)
        self.alive.extend(np.ones(len(rows), dtype=bool))
        self.versions.extend(np.asarray(versions, dtype=np.uint64))
        self.image_ids.extend(image_ids)
        self.product_ids.extend(product_ids)
        self.live_count += len(rows)
        self.version += 1
        return rows

    def delete(self, rows: np.ndarray) -> None:
        if len(rows) == 0:
            return
        with self.lock.write():
            self._tombstone(np.asarray(rows, dtype=np.int64))
            self.version += 1

    def _tombstone(self, rows: np.ndarray) -> None:
        """Mark live rows deleted; the caller holds the write lock."""
        self.alive.view[rows] = False
        self.live_count -= len(rows)
        if self.ivf is not None:
            self.ivf.remove_ids(faiss.IDSelectorBatch(rows))

    # --- compaction (the engine's training thread; see the module docstring) ------------------------------------
    def compaction_due(self) -> bool:
        dead = len(self.image_ids) - self.live_count
        return dead >= max(COMPACT_MIN_DEAD_ROWS, self.live_count)

    def compacted_copy(self) -> tuple[Partition, np.ndarray]:
        """A new partition of this one's live rows, renumbered from 0 in order, with the same trained index
        structure (no retraining), and the row each new row was copied from. Built from copies taken under the
        read lock a chunk at a time (COPY_CHUNK_ROWS), so a write waits at most for one chunk's copy; rows written
        since are added by `catch_up`. Rows never change once written, except that they die."""
        with self.lock.read():
            n0 = len(self.image_ids)
            kept = np.flatnonzero(self.alive.view[:n0])
            ivf = faiss.clone_index(self.ivf) if self.ivf is not None else None
            nlist, trained_at_rows = self.nlist, self.trained_at_rows
        copy = Partition(self.name, self.config)
        copy.training_failed_at_rows = self.training_failed_at_rows  # not tried again until it grows (review)
        if ivf is not None:
            ivf.reset()  # keeps the trained quantizer and codebooks
            copy.ivf, copy.nlist, copy.trained_at_rows, copy._exact = ivf, nlist, trained_at_rows, None
        copy.vectors.reserve(len(kept))
        copy._copy_rows(self, kept)
        copy.source_rows_seen = n0
        return copy, kept

    def catch_up(self, source: Partition, copied_from: np.ndarray, *, final: bool) -> np.ndarray:
        """Add `source`'s live rows written after the copy (`copied_from`: the source row of each of this
        partition's rows); with `final` (the caller stops writes meanwhile), also tombstone the rows that
        `source` deleted since. Returns the new `copied_from`."""
        with source.lock.read():
            n = len(source.image_ids)
            start = self.source_rows_seen
            added = start + np.flatnonzero(source.alive.view[start:n])
            gone = np.flatnonzero(~source.alive.view[copied_from]) if final else np.empty(0, np.int64)
        if len(added):
            self._copy_rows(source, added)
            copied_from = np.concatenate([copied_from, added])
        self.source_rows_seen = n
        if len(gone):
            self.delete(gone)
        return copied_from

    def _copy_rows(self, source: Partition, rows: np.ndarray) -> None:
        for start in range(0, len(rows), COPY_CHUNK_ROWS):
            chunk = rows[start:start + COPY_CHUNK_ROWS]
            # Only the copies under the source's read lock: encoding them into the IVF index under it held a write
            # to the source for 0.3 s (every write waits behind it, and the searches queued behind that writer:
            # review). The copy is this partition's alone until it is swapped in.
            with source.lock.read():
                x = source.vectors.take(chunk)
                attributes = source.attributes.take(chunk, self.attributes.dictionary_sizes())
                versions = source.versions.view[chunk]
                image_ids = source.image_ids.view[chunk].tolist()
                product_ids = source.product_ids.view[chunk].tolist()
            with self.lock.write():
                self.attributes.extend_taken(attributes)
                self._append_rows(x, versions, image_ids, product_ids)

    def records(self, rows: np.ndarray) -> list[tuple[tuple[str, str, dict, int], np.ndarray]]:
        """((image id, product id, attributes, write version), float32 vector) of the given live rows; tombstoned
        rows are skipped."""
        with self.lock.read():
            rows = rows[self.alive.view[rows]]
            return list(zip(self._details(rows), self.vectors.take(rows)))

    def _details(self, rows: np.ndarray) -> list[tuple[str, str, dict, int]]:
        """(image id, product id, attributes, write version) of rows; the caller holds the read lock."""
        return list(zip(self.image_ids.view[rows].tolist(), self.product_ids.view[rows].tolist(),
                        self.attributes.rows(rows), self.versions.view[rows].tolist()))

    # --- search ----------------------------------------------------------------------------------------------
    def live_details(self, rows: np.ndarray) -> list[tuple[str, str, dict, int] | None]:
        """The details of these rows (see `_details`), None for a row deleted meanwhile; under the read lock."""
        with self.lock.read():
            alive = self.alive.view[rows].tolist()
            details = iter(self._details(rows[self.alive.view[rows]]))
            return [next(details) if live else None for live in alive]

    def search(self, query: np.ndarray, k: int, flt: Filter, nprobe: int, exhaustive: bool, *,
               distinct: bool = False, exact_rows_limit: int | None = None,
               with_details: bool = True) -> PartitionHits:
        """Top-k rows (with their ids and attributes, read under the same lock) for a unit query vector.

        With `distinct`, the top-k products instead: each product's best-scoring row, at most one row per
        product id. With `exact_rows_limit`, a search that would score more rows than that one by one (an
        unindexed partition, or the exact fallback of an IVF search) raises :class:`ExactScanTooLong` instead,
        so that a caller on an event loop can hand it to a thread. Without `with_details`, rows and scores only
        (the caller reads the details of the rows it keeps with `live_details`).
        """
        with self.lock.read():
            t0 = time.perf_counter()
            hits = self._search_locked(query, k, flt, nprobe, exhaustive, distinct, exact_rows_limit)
            details = self._details(hits.rows) if with_details else None
            metrics.PARTITION_SEARCH_DURATION.labels(hits.strategy).observe(time.perf_counter() - t0)
            metrics.CANDIDATES_SCANNED.observe(hits.candidates_scanned)
            return PartitionHits(rows=hits.rows, scores=hits.scores, candidates_scanned=hits.candidates_scanned,
                                 strategy=hits.strategy, details=details)

    def _search_locked(self, query: np.ndarray, k: int, flt: Filter, nprobe: int, exhaustive: bool,
                       distinct: bool, exact_rows_limit: int | None) -> PartitionHits:
        n = len(self.image_ids)
        selection = self._selection(flt, n) if flt else None
        count = selection.count if selection is not None else self.live_count
        if count == 0:
            return PartitionHits(rows=np.empty(0, np.int64), scores=np.empty(0, np.float32),
                                 candidates_scanned=0, strategy="exact")
        if self.ivf is None:
            _check_exact_rows(n, exact_rows_limit)
            mask = selection.mask if selection is not None else self.alive.view[:n]
            scores = self._exact.view[:n] @ query if self._exact is not None else self.vectors.scores(query)
            return self._best(np.flatnonzero(mask), scores[mask], k, scanned=n, distinct=distinct)
        if exhaustive or (selection is not None and count <= self.config.exact_scan_max_rows):
            rows = np.flatnonzero(selection.mask if selection is not None else self.alive.view[:n])
            return self._best(rows, self.vectors.inner_products(rows, query), k, scanned=len(rows),
                              distinct=distinct)
        return self._search_ivf(query, k, nprobe, selection, count, distinct, exact_rows_limit)

    def _search_ivf(self, query: np.ndarray, k: int, nprobe: int, selection: _Selection | None,
                    count: int, distinct: bool, exact_rows_limit: int | None) -> PartitionHits:
        strategy = "ivf"
        selectivity = count / max(self.live_count, 1)
        if selection is not None and selectivity < self.config.wide_probe_below_selectivity:
            # A selective filter at a low nprobe leaves too few matching codes in the probed lists (-1 padding):
            # probe proportionally more lists so the expected number of matches stays the same. The floor
            # (filtered_nprobe_floor) matters because the filtered top-k lie farther out than the unfiltered
            # top-k (only one row in 1/selectivity qualifies): a query's own low nprobe, tuned for unfiltered
            # neighbours, gave recall@10 0.93 at 10 % selectivity on 200k vectors (docs/benchmarks.md).
            nprobe = math.ceil(max(nprobe, self.config.filtered_nprobe_floor) / selectivity)
            strategy = "ivf_wide"
        most_probes = max(1, min(self.nlist, self.config.max_nprobe))
        nprobe = max(1, min(nprobe, most_probes))
        wanted = min(k * self.config.rerank_factor, self.config.max_rerank_candidates)
        k_candidates = min(max(k, wanted), count)
        most_candidates = min(count, max(k_candidates,
                                         DISTINCT_MAX_CANDIDATES_FACTOR * self.config.max_rerank_candidates))
        while True:
            scanned = int(self.ivf.ntotal * nprobe / max(self.nlist, 1) * (selectivity if selection else 1.0))
            params = faiss.SearchParametersIVF(nprobe=nprobe)
            if selection is not None:
                params.sel = faiss.IDSelectorBitmap(len(selection.mask), faiss.swig_ptr(selection.bitmap))
            _, labels = self.ivf.search(query[None, :], k_candidates, params=params)
            rows = np.sort(labels[0][labels[0] >= 0])  # ascending rows: sequential-ish reads of the mapped vectors
            exhausted = len(rows) < k_candidates  # the probed lists held fewer (matching) rows than asked for
            if len(rows) < min(k, count):
                # The probed lists held fewer than k (matching) rows (-1 padding). Unfiltered: probe more lists
                # (a top_k of 1,000 at nprobe 16 of ~900 lists of 50k rows saw ~830 rows); filtered, or with
                # every list probed: answer from all live matching rows instead.
                if selection is None and nprobe < most_probes:
                    nprobe = min(most_probes, nprobe * DISTINCT_WIDEN_FACTOR)
                    continue
                return self._exact_over(query, k, selection, distinct, exact_rows_limit)
            hits = self._best(rows, self.vectors.inner_products(rows, query), k, scanned=scanned + len(rows),
                              distinct=distinct)
            if not distinct or len(hits.rows) >= k:
                break
            # Too few distinct products among the candidates (a product with many near-identical images). The
            # probed lists exhausted: probe more lists (every list probed: every matching row was seen, fewer
            # products match). Otherwise ask the same lists for more candidates, up to the cap.
            if exhausted:
                if nprobe >= most_probes:
                    if most_probes < self.nlist:  # max_nprobe left lists unprobed
                        return self._exact_over(query, k, selection, distinct, exact_rows_limit)
                    break
                nprobe = min(most_probes, nprobe * DISTINCT_WIDEN_FACTOR)
                continue
            if k_candidates >= most_candidates:
                break
            k_candidates = min(k_candidates * DISTINCT_WIDEN_FACTOR, most_candidates)
        return PartitionHits(rows=hits.rows, scores=hits.scores, candidates_scanned=hits.candidates_scanned,
                             strategy=strategy)

    def _exact_over(self, query: np.ndarray, k: int, selection: _Selection | None, distinct: bool,
                    exact_rows_limit: int | None) -> PartitionHits:
        """The answer from every live (matching) row."""
        rows = np.flatnonzero(selection.mask if selection is not None else self.alive.view[:len(self.image_ids)])
        _check_exact_rows(len(rows), exact_rows_limit)
        hits = self._best(rows, self.vectors.inner_products(rows, query), k, scanned=len(rows), distinct=distinct)
        return PartitionHits(rows=hits.rows, scores=hits.scores, candidates_scanned=hits.candidates_scanned,
                             strategy="exact")

    def _best(self, rows: np.ndarray, scores: np.ndarray, k: int, *, scanned: int,
              distinct: bool) -> PartitionHits:
        if not distinct:
            return self._top_k_of(rows, scores, k, scanned=scanned)
        return self._top_k_products_of(rows, scores, k, scanned=scanned)

    def _top_k_products_of(self, rows: np.ndarray, scores: np.ndarray, k: int, *, scanned: int) -> PartitionHits:
        """Each product's best row, the k best products: the distinct products among the m best rows, with m
        grown until k products are found (a product's best row ranks above every row of a worse product)."""
        m = min(len(rows), DISTINCT_WIDEN_FACTOR * k)
        while True:
            best = self._top_k_of(rows, scores, m, scanned=scanned)
            products = enumerate(self.product_ids.view[best.rows].tolist())
            picks = [position for position, _ in itertools.islice(first_of_each(products, key=itemgetter(1)), k)]
            if len(picks) == k or m >= len(rows):
                chosen = np.asarray(picks, dtype=np.int64)
                return PartitionHits(rows=best.rows[chosen], scores=best.scores[chosen],
                                     candidates_scanned=scanned, strategy="exact")
            m = min(len(rows), max(m * DISTINCT_WIDEN_FACTOR, self._through_the_cut(best.scores, scores) + m))

    @staticmethod
    def _through_the_cut(window: np.ndarray, scores: np.ndarray) -> int:
        """How many rows score at least the window's last score (to SCORE_TIE_DECIMALS): the next window takes
        all of a tie at the cut at once. Widening step by step ranked a tie of thousands (copies of one picture, a
        placeholder) by image id at every step (50k copies: 20 -> 320 ms a search, reviews of 2026-12-05)."""
        if not len(window):
            return 0
        near = scores[scores >= window[-1] - 10.0 ** -SCORE_TIE_DECIMALS]
        return int(np.count_nonzero(rounded_scores(near).astype(np.float32)
                                    >= window[-1]))

    def _top_k_of(self, rows: np.ndarray, scores: np.ndarray, k: int, *, scanned: int) -> PartitionHits:
        """The k best rows and their scores rounded to SCORE_TIE_DECIMALS, equal ones by image id, so that
        replicas whose rows lie in another order answer alike (types.rank_key)."""
        if len(rows) > k:
            part = np.argpartition(-scores, k - 1)[:k]
            # Rows outside these k that may round to a top-k score (usually none): then the rows near the cut
            # are ranked by their rounded scores and ids. Rounding every row cost ~2 ms over 200k rows.
            floor = scores[part].min() - 10.0 ** -SCORE_TIE_DECIMALS
            if np.count_nonzero(scores >= floor) > k:
                return self._top_k_at_a_tie(rows, scores, np.flatnonzero(scores >= floor), k, scanned)
            rows, scores = rows[part], scores[part]
        keys = rounded_scores(scores)
        return self._ranked(rows, keys, scanned)

    def _top_k_at_a_tie(self, rows: np.ndarray, scores: np.ndarray, near: np.ndarray, k: int,
                        scanned: int) -> PartitionHits:
        rows, keys = rows[near], rounded_scores(scores[near])
        if len(rows) > k:
            part = np.argpartition(-keys, k - 1)[:k]
            kth = keys[part].min()
            above, tied = np.flatnonzero(keys > kth), np.flatnonzero(keys == kth)
            if len(above) + len(tied) > k:  # rows tied at the cut: the smallest image ids of them go in
                ids = self.image_ids.view[rows[tied]].tolist()
                chosen = [i for _, i in heapq.nsmallest(k - len(above), zip(ids, tied.tolist()))]
                part = np.concatenate([above, np.asarray(chosen, dtype=np.int64)])
            rows, keys = rows[part], keys[part]
        return self._ranked(rows, keys, scanned)

    def _ranked(self, rows: np.ndarray, keys: np.ndarray, scanned: int) -> PartitionHits:
        """Rows best first by rounded score, then image id; the scores as ranked, so that an answer's scores never
        rise down the list."""
        order = np.argsort(-keys, kind="stable")
        ranked = keys[order]
        if len(ranked) > 1 and (ranked[1:] == ranked[:-1]).any():
            by_id = np.empty(len(rows), dtype=np.int64)
            by_id[np.argsort(self.image_ids.view[rows], kind="stable")] = np.arange(len(rows))
            order = np.lexsort((by_id, -keys))
            ranked = keys[order]
        return PartitionHits(rows=rows[order], scores=ranked.astype(np.float32), candidates_scanned=scanned,
                             strategy="exact")

    def _selection(self, flt: Filter, n: int) -> _Selection:
        if _filter_values(flt) > MASK_CACHE_MAX_FILTER_VALUES:
            # Not kept: the cache is bounded by entries, and a key of thousands of values is as big as its mask.
            mask = self.attributes.mask(flt, n) & self.alive.view[:n]
            return _Selection(mask=mask, count=int(np.count_nonzero(mask)),
                              bitmap=np.packbits(mask, bitorder="little"))
        key = (flt, self.version)
        with self._masks_lock:
            cached = self._masks.get(key)
            if cached is not None:
                self._masks.move_to_end(key)
                return cached
        mask = self.attributes.mask(flt, n) & self.alive.view[:n]
        selection = _Selection(mask=mask, count=int(np.count_nonzero(mask)),
                               bitmap=np.packbits(mask, bitorder="little"))
        with self._masks_lock:
            self._masks[key] = selection
            while len(self._masks) > MASK_CACHE_SIZE:
                self._masks.popitem(last=False)
        return selection

    # --- background training -----------------------------------------------------------------------------------
    def wants_training(self) -> bool:
        live = self.live_count
        if live <= self.training_failed_at_rows:
            return False
        if self.ivf is None:
            return live >= self.config.training_threshold()
        return (live >= self.config.retrain_growth_factor * max(self.trained_at_rows, 1)
                and self.config.nlist_for(live) > self.nlist)

    def train_and_swap(self) -> None:
        """Train a fresh IVF index on a sample, add every row, catch up with writes, swap it in."""
        with self.lock.read():
            n0 = len(self.image_ids)
            live_rows = np.flatnonzero(self.alive.view[:n0])
        nlist = self.config.nlist_for(len(live_rows))
        rng = np.random.default_rng(len(live_rows))
        sample_size = min(len(live_rows), self.config.max_train_points_per_centroid * nlist)
        sample = np.sort(rng.choice(live_rows, size=sample_size, replace=False))
        with self.lock.read():
            train_x = self.vectors.take(sample)
        factory = self.config.factory_for(nlist)
        index = faiss.index_factory(self.config.dimension, factory, faiss.METRIC_INNER_PRODUCT)
        ivf = faiss.extract_index_ivf(index)
        ivf.cp.niter = self.config.kmeans_iterations
        ivf.cp.max_points_per_centroid = max(self.config.max_train_points_per_centroid, 1)
        t0 = time.perf_counter()
        index.train(train_x)
        del train_x
        log.info("partition %s: trained %s on %d of %d vectors in %.1fs", self.name, factory, sample_size,
                 len(live_rows), time.perf_counter() - t0)
        added_until = 0
        while True:
            with self.lock.read():
                n_now = len(self.image_ids)
            if n_now - added_until <= CATCH_UP_UNDER_LOCK_ROWS:
                break
            for start in range(added_until, n_now, ADD_CHUNK_ROWS):
                self._add_rows(index, start, min(n_now, start + ADD_CHUNK_ROWS))
            added_until = n_now
        with self.lock.write():
            n_now = len(self.image_ids)
            self._add_rows(index, added_until, n_now, locked=True)
            dead = np.flatnonzero(~self.alive.view[:added_until])
            if len(dead):
                index.remove_ids(faiss.IDSelectorBatch(dead.astype(np.int64)))
            self.ivf = index
            self.nlist = nlist
            self.trained_at_rows = self.live_count
            self._exact = None
            self.version += 1
        log.info("partition %s: swapped in %s (%d vectors) in %.1fs total", self.name, factory, index.ntotal,
                 time.perf_counter() - t0)

    def _add_rows(self, index: faiss.Index, start: int, stop: int, *, locked: bool = False) -> None:
        if stop <= start:
            return
        if locked:
            rows = start + np.flatnonzero(self.alive.view[start:stop])
            x = self.vectors.take(rows)
        else:
            with self.lock.read():
                rows = start + np.flatnonzero(self.alive.view[start:stop])
                x = self.vectors.take(rows)
        if len(rows):
            index.add_with_ids(x, rows.astype(np.int64))

    # --- introspection ---------------------------------------------------------------------------------------
    @property
    def index_type(self) -> str:
        return self.config.factory_for(self.nlist) if self.ivf is not None else "Flat"

    def resident_bytes(self) -> int:
        """Index codes + ids (+ coarse centroids), exact-mode float32 copy, unsnapshotted vectors, attributes."""
        # The references are taken under the lock and the IVF lists walked outside it (~5 ms for 4,000 lists,
        # which would hold up a writer and the searches queued behind it). The local reference keeps the index
        # alive: a swap only rebinds self.ivf, and walking a freed index's lists crashed the shard (SIGSEGV).
        with self.lock.read():
            ivf, exact, nlist = self.ivf, self._exact, self.nlist
            total = (self.attributes.nbytes + self.alive.nbytes + self.versions.nbytes
                     + self.vectors.resident_nbytes)
        if exact is not None:
            total += exact.nbytes
        if ivf is not None:
            total += _index_code_bytes(ivf) + nlist * self.config.dimension * 4
        return total

    def index_code_bytes(self) -> int:
        """PQ codes and ids held by the IVF lists."""
        ivf = self.ivf  # see resident_bytes
        return _index_code_bytes(ivf) if ivf is not None else 0


def _index_code_bytes(ivf_index) -> int:
    """PQ codes and ids held by an IVF index's lists (the caller holds a reference to the index)."""
    invlists = faiss.downcast_InvertedLists(faiss.extract_index_ivf(ivf_index).invlists)
    blocked = isinstance(invlists, faiss.BlockInvertedLists)  # fast-scan: codes in blocks of n_per_block
    total = 0
    for i in range(invlists.nlist):
        size = invlists.list_size(i)
        if blocked:
            total += -(-size // invlists.n_per_block) * invlists.block_size
        else:
            total += size * invlists.code_size
        total += size * 8  # int64 ids
    return total


def _filter_values(flt: Filter) -> int:
    return sum(len(c.predicate.values) for c in flt.all_of if isinstance(c.predicate, AnyOf))
