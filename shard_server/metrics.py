"""Prometheus metrics of the shard server (names fixed by the project's metric contract).

Labels are bounded: categories are chosen by the writers (20,000 categories made 10,000 series per gauge and a
3 MB /metrics per shard when they were a label), so the index is described by totals here and per category by
the Stats RPC (`imgsearch stats`)."""

from __future__ import annotations

import threading

from prometheus_client import Counter, Gauge, Histogram

from imgsearch.serving import LATENCY_BUCKETS_S

# Per partition, not per request: a search over many categories observes once per category it covers. The
# per-request latency (the shard's objective) is grpc_server_handling_seconds of ShardService Search/SearchBatch
# calls and SearchStream messages.
PARTITION_SEARCH_DURATION = Histogram(
    "imgsearch_shard_partition_search_duration_seconds",
    "Time to search one partition (one category) by strategy; a request covering N categories observes N times. "
    "Per-request latency: grpc_server_handling_seconds{grpc_service=\"imgsearch.v1.ShardService\"}.",
    ["strategy"], buckets=LATENCY_BUCKETS_S)
CANDIDATES_SCANNED = Histogram(
    "imgsearch_shard_candidates_scanned",
    "Vectors whose distance was computed per partition searched (codes + re-rank).",
    buckets=(10, 100, 1_000, 3_000, 10_000, 30_000, 100_000, 300_000, 1_000_000, 3_000_000, 10_000_000))
VECTORS = Gauge("imgsearch_shard_vectors", "Live vectors held by this shard replica, all categories together.")
CATEGORIES = Gauge("imgsearch_shard_categories", "Categories holding live vectors on this shard replica.")
CATEGORIES_UNTRAINED = Gauge(
    "imgsearch_shard_categories_untrained",
    "Categories holding live vectors that have no trained IVF-PQ index yet (searched exactly).")
TRAINING_EVENTS = Counter("imgsearch_shard_training_events_total", "Background training events.", ["event"])
INDEX_SWAPS = Counter("imgsearch_shard_index_swaps_total", "Trained indexes swapped in.")
COMPACTIONS = Counter("imgsearch_shard_compactions_total",
                      "Partitions replaced by a copy of their live rows (deleted and replaced rows dropped).", ["event"])
WAL_BYTES = Gauge("imgsearch_shard_wal_bytes", "Size of the write-ahead log on disk.")
SNAPSHOTS = Counter("imgsearch_shard_snapshots_total", "Snapshots written.")
RESIDENT_BYTES = Gauge("imgsearch_shard_resident_bytes",
                       "Bytes held in memory by indexes, ids and attributes (memory-mapped vectors excluded).")

STRATEGIES = ("exact", "ivf", "ivf_wide")
for _s in STRATEGIES:
    PARTITION_SEARCH_DURATION.labels(_s)
for _e in ("started", "completed", "failed"):
    TRAINING_EVENTS.labels(_e)
for _e in ("completed", "failed"):
    COMPACTIONS.labels(_e)


class CategoryTotals:
    """Keeps VECTORS, CATEGORIES and CATEGORIES_UNTRAINED current from per-category updates, in O(1) each.

    Shared by every engine of the process (tests run several): entries are keyed by (owner, category)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: dict[tuple[int, str], tuple[int, bool]] = {}  # (owner, category) -> (live vectors, trained)
        self._vectors = 0
        self._untrained = 0

    def update(self, owner: int, category: str, vectors: int, trained: bool) -> None:
        """The category's current state; a category with no live vectors is forgotten."""
        key = (owner, category)
        with self._lock:
            old_vectors, old_trained = self._held.pop(key, (0, True))
            self._vectors -= old_vectors
            self._untrained -= 0 if old_trained else 1
            if vectors:
                self._held[key] = (vectors, trained)
                self._vectors += vectors
                self._untrained += 0 if trained else 1
            self._publish()

    def forget(self, owner: int) -> None:
        """Drop every category of an owner (an engine that closed)."""
        with self._lock:
            for key in [k for k in self._held if k[0] == owner]:
                vectors, trained = self._held.pop(key)
                self._vectors -= vectors
                self._untrained -= 0 if trained else 1
            self._publish()

    def _publish(self) -> None:
        VECTORS.set(self._vectors)
        CATEGORIES.set(len(self._held))
        CATEGORIES_UNTRAINED.set(self._untrained)


CATEGORY_TOTALS = CategoryTotals()
