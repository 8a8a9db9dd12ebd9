"""Retrieval metrics over L2-normalised embeddings, with pytorch-metric-learning's definitions.

- Recall@K: fraction of queries with at least one gallery item of their label among the K nearest.
- MAP@R (Musgrave et al., "A Metric Learning Reality Check"): R = number of gallery items sharing the query's
  label; MAP@R = mean over queries of (1/R) * sum_{i<=R} P@i * [item i is relevant].
Queries whose label has no gallery item are left out of both (they have no right answer).
When the query set is the gallery (leave-one-out), pass `exclude_self=True` so a photo never finds itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def cosine_similarities(queries: np.ndarray, gallery: np.ndarray) -> np.ndarray:
    """(Q,D) x (G,D) -> (Q,G) cosine similarities (inputs need not be normalised)."""
    q = queries / np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-12)
    g = gallery / np.maximum(np.linalg.norm(gallery, axis=1, keepdims=True), 1e-12)
    return q.astype(np.float32) @ g.astype(np.float32).T


def relevance_matrix(query_labels: Sequence, gallery_labels: Sequence) -> np.ndarray:
    """(Q,G) bool: gallery item j shares query i's label."""
    return np.asarray(query_labels)[:, None] == np.asarray(gallery_labels)[None, :]


def _mask_self(similarities: np.ndarray, relevant: np.ndarray, exclude_self: bool) -> tuple[np.ndarray, np.ndarray]:
    if not exclude_self:
        return similarities, relevant
    if similarities.shape[0] != similarities.shape[1]:
        raise ValueError("exclude_self needs the queries to be the gallery")
    similarities, relevant = similarities.copy(), relevant.copy()
    np.fill_diagonal(similarities, -np.inf)
    np.fill_diagonal(relevant, False)
    return similarities, relevant


def ranked_relevance(similarities: np.ndarray, relevant: np.ndarray, k: int) -> np.ndarray:
    """(Q,k) bool: relevance of each query's k most similar gallery items, best first (stable on ties)."""
    order = np.argsort(-similarities, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(relevant, order, axis=1)


def recall_at_k(similarities: np.ndarray, query_labels: Sequence, gallery_labels: Sequence,
                ks: Sequence[int] = (1, 5, 10), *, exclude_self: bool = False) -> dict[int, float]:
    sims, relevant = _mask_self(similarities, relevance_matrix(query_labels, gallery_labels), exclude_self)
    answerable = relevant.any(axis=1)
    if not answerable.any():
        return {k: float("nan") for k in ks}
    ranked = ranked_relevance(sims[answerable], relevant[answerable], max(ks))
    return {k: float(ranked[:, :k].any(axis=1).mean()) for k in ks}


def map_at_r(similarities: np.ndarray, query_labels: Sequence, gallery_labels: Sequence, *,
             exclude_self: bool = False) -> float:
    sims, relevant = _mask_self(similarities, relevance_matrix(query_labels, gallery_labels), exclude_self)
    r_per_query = relevant.sum(axis=1)
    answerable = r_per_query > 0
    if not answerable.any():
        return float("nan")
    sims, relevant, r_per_query = sims[answerable], relevant[answerable], r_per_query[answerable]
    ranked = ranked_relevance(sims, relevant, int(r_per_query.max())).astype(np.float64)
    positions = np.arange(1, ranked.shape[1] + 1)
    within_r = positions[None, :] <= r_per_query[:, None]
    precision_at_i = np.cumsum(ranked, axis=1) / positions[None, :]
    ap = (precision_at_i * ranked * within_r).sum(axis=1) / r_per_query
    return float(ap.mean())


@dataclass(frozen=True, kw_only=True)
class ThresholdPoint:
    threshold: float
    precision: float
    recall: float
    f1: float


def threshold_sweep(similarities: np.ndarray, query_labels: Sequence, gallery_labels: Sequence,
                    thresholds: Sequence[float] | None = None, *, exclude_self: bool = False
                    ) -> list[ThresholdPoint]:
    """"Same product" decisions on every query-gallery pair: predict same when cosine >= threshold.

    Precision/recall/F1 of the positive (same product) class at each threshold.
    """
    relevant = relevance_matrix(query_labels, gallery_labels)
    scores = similarities
    if exclude_self:
        off_diagonal = ~np.eye(similarities.shape[0], dtype=bool)
        scores, relevant = similarities[off_diagonal], relevant[off_diagonal]
    scores, relevant = np.ravel(scores), np.ravel(relevant)
    if thresholds is None:
        thresholds = np.round(np.arange(-1.0, 1.0001, 0.01), 2)
    order = np.argsort(-scores, kind="stable")
    sorted_scores, sorted_relevant = scores[order], relevant[order]
    true_pos_cum = np.concatenate([[0], np.cumsum(sorted_relevant)])
    total_pos = int(relevant.sum())
    points = []
    for t in thresholds:
        predicted = int(np.searchsorted(-sorted_scores, -t, side="right"))  # count of scores >= t
        tp = int(true_pos_cum[predicted])
        precision = tp / predicted if predicted else 1.0
        recall = tp / total_pos if total_pos else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        points.append(ThresholdPoint(threshold=float(t), precision=precision, recall=recall, f1=f1))
    return points


def best_f1(points: Sequence[ThresholdPoint]) -> ThresholdPoint:
    return max(points, key=lambda p: (p.f1, p.threshold))


def retrieval_report(similarities: np.ndarray, query_labels: Sequence, gallery_labels: Sequence, *,
                     exclude_self: bool = False) -> dict:
    """Recall@1/5/10, MAP@R and the best-F1 threshold, as one JSON-ready dict."""
    recalls = recall_at_k(similarities, query_labels, gallery_labels, exclude_self=exclude_self)
    sweep = threshold_sweep(similarities, query_labels, gallery_labels, exclude_self=exclude_self)
    best = best_f1(sweep)
    _, relevant = _mask_self(similarities, relevance_matrix(query_labels, gallery_labels), exclude_self)
    return {
        "queries": len(query_labels),
        "answerable_queries": int(relevant.any(axis=1).sum()),  # those with a right answer: what Recall averages
        "gallery": len(gallery_labels),
        **{f"recall@{k}": v for k, v in recalls.items()},
        "map@r": map_at_r(similarities, query_labels, gallery_labels, exclude_self=exclude_self),
        "best_f1": {"threshold": best.threshold, "precision": best.precision, "recall": best.recall,
                    "f1": best.f1},
        "sweep": [vars(p) for p in sweep if p.threshold >= 0],
    }


def product_ranks(query_emb: np.ndarray, query_labels: Sequence[str], gallery_emb: np.ndarray,
                  gallery_labels: Sequence[str]) -> np.ndarray:
    """1-based rank of each query's product among the gallery's products, by each product's best cosine; 0 for a
    query whose product has no gallery item (no right answer: `rank_summary` leaves it out, as `recall_at_k` does;
    it raised KeyError before). A product tied with the right one does not rank above it (`recall_at_k` breaks
    ties by gallery order instead; with real-valued embeddings only identical images tie)."""
    products = sorted(set(gallery_labels))
    column = {p: i for i, p in enumerate(products)}
    owner = np.array([column[label] for label in gallery_labels])
    best = np.full((len(query_emb), len(products)), -np.inf, dtype=np.float32)
    np.maximum.at(best.T, owner, (query_emb @ gallery_emb.T).T)  # best[q, p] = max over p's images
    answerable = np.array([label in column for label in query_labels], dtype=bool)
    right = best[np.arange(len(query_emb)), [column.get(label, 0) for label in query_labels]]
    return np.where(answerable, 1 + (best > right[:, None]).sum(axis=1), 0)


def rank_summary(ranks: np.ndarray) -> dict:
    """Recall@1/5/10 and MRR of 1-based ranks (0: a query with no right answer, left out)."""
    ranks = np.asarray(ranks)
    ranks = ranks[ranks > 0]
    if not len(ranks):
        return {**{f"recall@{k}": float("nan") for k in (1, 5, 10)}, "mrr": float("nan")}
    return {**{f"recall@{k}": float((ranks <= k).mean()) for k in (1, 5, 10)}, "mrr": float((1 / ranks).mean())}
