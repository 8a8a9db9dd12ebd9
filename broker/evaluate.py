"""`imgsearch eval`: how well a running broker finds the right product for labelled query photos.

Every query image is searched as a shop's backend would search it (image bytes over gRPC, through the duplicate
cache, Triton and the shards) with `distinct_products`, so the answer ranks products. A query scores when its
own product is among the first k of them (Recall@k, the product-level Recall@K of embedder.metrics) and by the
reciprocal of that rank (MRR). Refused or failed searches are counted by status code (and files that cannot be
read as FILE_UNREADABLE) and score as misses, so broken query files lower the figures instead of stopping the
run. Latency is the client's wall time
per search.

Unlike `imgsearch-embed eval` (the model alone, exact search, in process), this measures the deployed system:
the IVF-PQ approximation, the duplicate cache, filters and timeouts included.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from broker.catalogue import CatalogueFile
from broker.types import SearchAnswer
from imgsearch.errors import ImgsearchError
from shard_server.types import Filter, Hit

RECALL_AT = (1, 5, 10)
UNREADABLE = "FILE_UNREADABLE"  # the error of a query whose file could not be read (not a gRPC status)


@dataclass(frozen=True, kw_only=True)
class QueryOutcome:
    image_id: str
    product_id: str
    rank: int | None  # 1-based rank of the query's product among the returned products; None: not returned
    latency_s: float
    top_product: str | None = None  # the first product returned: what a miss was mistaken for
    from_cache: bool = False
    partial: bool = False
    # the gRPC status name of a failed search (INVALID_ARGUMENT, DEADLINE_EXCEEDED...), or UNREADABLE
    error: str | None = None

    def to_json(self) -> dict:
        return {"image_id": self.image_id, "product_id": self.product_id, "rank": self.rank,
                "top_product": self.top_product, "latency_ms": round(self.latency_s * 1e3, 2),
                "from_duplicate_cache": self.from_cache, "partial": self.partial, "error": self.error}


@dataclass(frozen=True, kw_only=True)
class EvalReport:
    queries: int
    answered: int
    top_k: int
    recall_at: dict[int, float]  # over every query; a failed search is a miss
    mrr: float
    latency_p50_s: float
    latency_p95_s: float
    latency_p99_s: float
    from_cache: int
    partial: int
    errors: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "queries": self.queries, "answered": self.answered, "top_k": self.top_k,
            **{f"recall@{k}": round(v, 4) for k, v in self.recall_at.items()},
            "mrr": round(self.mrr, 4),
            "latency_p50_ms": round(self.latency_p50_s * 1e3, 2),
            "latency_p95_ms": round(self.latency_p95_s * 1e3, 2),
            "latency_p99_ms": round(self.latency_p99_s * 1e3, 2),
            "from_duplicate_cache": self.from_cache, "partial": self.partial, "errors": dict(self.errors),
        }


def product_rank(hits: Sequence[Hit], product_id: str) -> int | None:
    """1-based rank of `product_id` among the distinct products of `hits`, in hit order."""
    seen: set[str] = set()  # top_k may be 1,000 hits: a set keeps this linear
    for hit in hits:
        if hit.product_id not in seen:
            seen.add(hit.product_id)
            if hit.product_id == product_id:
                return len(seen)
    return None


def outcome_of(query: CatalogueFile, answer: SearchAnswer, latency_s: float) -> QueryOutcome:
    return QueryOutcome(image_id=query.image_id, product_id=query.product_id,
                        rank=product_rank(answer.hits, query.product_id), latency_s=latency_s,
                        top_product=answer.hits[0].product_id if answer.hits else None,
                        from_cache=answer.from_duplicate_cache, partial=answer.partial)


def summarise(outcomes: Sequence[QueryOutcome], *, top_k: int) -> EvalReport:
    if not outcomes:
        raise ValueError("no queries to summarise")
    n = len(outcomes)
    ranks = [o.rank for o in outcomes if o.error is None]
    latencies = np.array([o.latency_s for o in outcomes if o.error is None] or [0.0])
    return EvalReport(
        queries=n,
        answered=len(ranks),
        top_k=top_k,
        # Recall@1/5/10 up to top_k, and at top_k itself (`-k 3` printed Recall@1 alone: CLI review)
        recall_at={k: sum(r is not None and r <= k for r in ranks) / n
                   for k in sorted({*RECALL_AT, top_k}) if k <= top_k},
        mrr=sum(1.0 / r for r in ranks if r is not None) / n,
        latency_p50_s=float(np.percentile(latencies, 50)),
        latency_p95_s=float(np.percentile(latencies, 95)),
        latency_p99_s=float(np.percentile(latencies, 99)),
        from_cache=sum(o.from_cache for o in outcomes),
        partial=sum(o.partial for o in outcomes),
        errors=dict(Counter(o.error for o in outcomes if o.error is not None)),
    )


async def evaluate(client, queries: Sequence[CatalogueFile], *, top_k: int = 10, filter: Filter = Filter(),
                   own_category: bool = False, use_duplicate_cache: bool = True, concurrency: int = 1,
                   timeout_s: float = 10.0, progress: bool = False) -> list[QueryOutcome]:
    """Search every query through `client` (a broker.client.BrokerClient), `concurrency` at a time; outcomes in
    the order of `queries`. `own_category` restricts each search to its query's category."""
    if top_k < 1 or concurrency < 1:
        raise ValueError("top_k and concurrency must be >= 1")
    from tqdm import tqdm

    slots = asyncio.Semaphore(concurrency)
    bar = tqdm(total=len(queries), unit="query", desc="eval", disable=not progress)

    async def one(query: CatalogueFile) -> QueryOutcome:
        async with slots:
            try:
                data = await asyncio.to_thread(query.path.read_bytes)
            except OSError:  # a listed file that is missing or unreadable: counted, the run goes on
                bar.update(1)
                return QueryOutcome(image_id=query.image_id, product_id=query.product_id, rank=None, latency_s=0.0,
                                    error=UNREADABLE)
            started = time.perf_counter()
            try:
                answer = await client.search(image=data, top_k=top_k, distinct_products=True, filter=filter,
                                             categories=(query.category,) if own_category else (),
                                             use_duplicate_cache=use_duplicate_cache, timeout_s=timeout_s)
            except ImgsearchError as exc:
                outcome = QueryOutcome(image_id=query.image_id, product_id=query.product_id, rank=None,
                                       latency_s=time.perf_counter() - started, error=exc.code.name)
            else:
                outcome = outcome_of(query, answer, time.perf_counter() - started)
            bar.update(1)
            return outcome

    try:
        return list(await asyncio.gather(*(one(q) for q in queries)))
    finally:
        bar.close()


def format_report(report: EvalReport) -> str:
    recalls = "  ".join(f"Recall@{k} {v:.3f}" for k, v in report.recall_at.items())
    lines = [
        f"{report.queries} queries, {report.answered} answered (top {report.top_k} products each)",
        f"{recalls}  MRR {report.mrr:.3f}",
        (f"latency p50 {report.latency_p50_s * 1e3:.1f} ms, p95 {report.latency_p95_s * 1e3:.1f} ms, "
         f"p99 {report.latency_p99_s * 1e3:.1f} ms"),
        f"from the duplicate cache: {report.from_cache}; partial answers: {report.partial}",
    ]
    if report.errors:
        lines.append("failed: " + ", ".join(f"{code} x{count}" for code, count in sorted(report.errors.items())))
    return "\n".join(lines)
