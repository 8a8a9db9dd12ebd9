"""The cyclic garbage collector's pauses: measured for Prometheus, and kept short.

A collection holds the GIL from start to end, so every RPC in flight in the process waits for it. A full
(generation 2) collection walks every tracked container, including each item of every list; the cost grows with
what a process keeps in memory, not with its traffic. Two remedies, both here:

* ``imgsearch_gc_pause_seconds{generation}``: how long each collection took, so a latency tail that follows
  collections shows up next to the RPC histograms. Filled by a ``gc.callbacks`` hook into plain per-process
  counters and turned into a histogram when Prometheus scrapes; the hook takes no lock, since a collection can
  start inside any code, including a prometheus_client metric update that holds that metric's lock.
* ``freeze_startup_objects()``: after start-up, move everything alive (modules, classes, functions: tens of
  thousands of objects that live as long as the process) out of the collector's reach with ``gc.freeze()``, so
  a full collection walks only what was created since.

``scrape_full_collections`` reads the full collections back from a running service (the stall probe and the
comparison record them).
"""

from __future__ import annotations

import bisect
import gc
import itertools
import math
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass

from prometheus_client import REGISTRY
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import CollectorRegistry

# Buckets around the services' latency budget: a pause past a few milliseconds is visible in a search's p99.
GC_PAUSE_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25)
GENERATIONS = 3


class GcPauseCollector:
    """``imgsearch_gc_pause_seconds`` for this process; ``callback`` goes into ``gc.callbacks``."""

    def __init__(self) -> None:
        self._started_at = 0.0
        # Per generation: observations per bucket (the last one past every bound), and their sum. Only the
        # callback writes them, and collections never overlap (the collector is not re-entrant).
        self._counts = [[0] * (len(GC_PAUSE_BUCKETS_S) + 1) for _ in range(GENERATIONS)]
        self._sums_s = [0.0] * GENERATIONS

    def callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started_at = time.perf_counter()
            return
        elapsed_s = time.perf_counter() - self._started_at
        generation = min(int(info.get("generation", 0)), GENERATIONS - 1)
        self._counts[generation][bisect.bisect_left(GC_PAUSE_BUCKETS_S, elapsed_s)] += 1
        self._sums_s[generation] += elapsed_s

    def collect(self) -> Iterator[HistogramMetricFamily | GaugeMetricFamily]:
        family = HistogramMetricFamily(
            "imgsearch_gc_pause_seconds",
            "Time each cyclic garbage collection held the GIL (every RPC in flight waits), by generation",
            labels=["generation"],
        )
        for generation in range(GENERATIONS):
            cumulative = list(itertools.accumulate(self._counts[generation]))
            buckets = [(repr(bound), count) for bound, count in zip(GC_PAUSE_BUCKETS_S, cumulative, strict=False)]
            buckets.append(("+Inf", cumulative[-1]))
            family.add_metric([str(generation)], buckets, self._sums_s[generation])
        yield family
        yield GaugeMetricFamily(
            "imgsearch_gc_frozen_objects",
            "Objects moved out of the garbage collector's reach at start-up (gc.freeze)",
            value=gc.get_freeze_count(),
        )


_installed: GcPauseCollector | None = None


def install_gc_pause_metric(registry: CollectorRegistry = REGISTRY) -> GcPauseCollector:
    """Hook the collector into ``gc.callbacks`` and the registry, once per process (later calls return it)."""
    global _installed  # noqa: PLW0603 - one hook per process, like the default registry itself
    if _installed is None:
        collector = GcPauseCollector()
        gc.callbacks.append(collector.callback)
        registry.register(collector)
        _installed = collector
    return _installed


def freeze_startup_objects() -> int:
    """Collect once, then freeze everything still alive; the number of objects frozen.

    For a service's ``main()`` once its modules are imported and before it serves. The collection first frees
    whatever start-up garbage there is, so freezing keeps nothing that was already unreachable. Frozen objects
    are still freed when their reference count drops to zero; only a frozen object that later becomes part of
    an unreachable cycle is never reclaimed, which start-up objects (modules, classes, functions) do not.
    """
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


@dataclass(frozen=True, kw_only=True)
class FullCollections:
    """A process's full (generation 2) collections as its /metrics reports them, or the difference of two
    readings (``since``)."""

    count: int = 0
    total_s: float = 0.0
    buckets: tuple[tuple[float, int], ...] = ()  # cumulative (upper bound in seconds, count), +Inf last

    def since(self, earlier: FullCollections) -> FullCollections:
        before = dict(earlier.buckets)
        return FullCollections(count=self.count - earlier.count, total_s=self.total_s - earlier.total_s,
                               buckets=tuple((b, n - before.get(b, 0)) for b, n in self.buckets))

    def __add__(self, other: FullCollections) -> FullCollections:
        theirs = dict(other.buckets)
        buckets = self.buckets or tuple((b, 0) for b, _ in other.buckets)
        return FullCollections(count=self.count + other.count, total_s=self.total_s + other.total_s,
                               buckets=tuple((b, n + theirs.get(b, 0)) for b, n in buckets))

    @property
    def longest_at_most_s(self) -> float | None:
        """The smallest bucket bound that holds every collection (None: no collection)."""
        if self.count == 0:
            return None
        return next((bound for bound, n in self.buckets if n >= self.count), math.inf)

    def describe(self) -> str:
        if self.count == 0:
            return "0 full GCs"
        longest = self.longest_at_most_s
        bound = (f"longest > {GC_PAUSE_BUCKETS_S[-1] * 1e3:g} ms" if math.isinf(longest)
                 else f"longest <= {longest * 1e3:g} ms")
        return f"{self.count} full GCs ({self.total_s * 1e3:.0f} ms in all), {bound}"

    def as_dict(self) -> dict:
        """Plain JSON: the bound is None without collections or when one outlasted the largest bucket."""
        longest = self.longest_at_most_s
        return {"count": self.count, "total_ms": round(self.total_s * 1e3, 1),
                "longest_at_most_ms": None if longest is None or math.isinf(longest) else longest * 1e3}


def scrape_full_collections(metrics_port: int | None, *, host: str = "127.0.0.1",
                            timeout_s: float = 10.0) -> FullCollections:
    """Read ``imgsearch_gc_pause_seconds{generation="2"}`` from a service's /metrics (nothing without a port)."""
    if metrics_port is None:
        return FullCollections()
    with urllib.request.urlopen(f"http://{host}:{metrics_port}/metrics", timeout=timeout_s) as response:
        text = response.read().decode()
    count, total_s, buckets = 0, 0.0, []
    for family in text_string_to_metric_families(text):
        if family.name != "imgsearch_gc_pause_seconds":
            continue
        for sample in family.samples:
            if sample.labels.get("generation") != "2":
                continue
            if sample.name.endswith("_count"):
                count = int(sample.value)
            elif sample.name.endswith("_sum"):
                total_s = sample.value
            elif sample.name.endswith("_bucket"):
                buckets.append((float(sample.labels["le"]), int(sample.value)))
    return FullCollections(count=count, total_s=total_s, buckets=tuple(sorted(buckets)))
