"""Deterministic synthetic catalogue: clustered unit vectors and attributes with known selectivities.

Vectors: ``clusters`` random unit centres; a point is a centre plus isotropic Gaussian noise of norm about
``spread``, re-normalised. Vector ``i`` depends only on (seed, i) (generated in fixed chunks), so any range can
be produced on its own, which lets a 1M-vector benchmark stream without holding everything in memory.

Attributes are drawn from a separate stream, independent of the clusters:
  price ~ uniform[0, 100)   -> ``selectivity_filter(s)`` = price < 100*s matches a fraction s
  colour: one of 10 (uniform)   brand: one of 20 (uniform)   in_stock: 50 %
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from shard_server.types import Condition, Equals, Filter, Is, Range, Record

CHUNK = 4096
COLOURS = tuple(f"colour-{i}" for i in range(10))
BRANDS = tuple(f"brand-{i:02d}" for i in range(20))


class SyntheticCatalogue:
    def __init__(self, *, dim: int = 512, clusters: int = 256, spread: float = 1.0, seed: int = 0):
        self.dim, self.clusters, self.spread, self.seed = dim, clusters, spread, seed
        centres = np.random.default_rng([seed, 0xC0FFEE]).standard_normal((clusters, dim)).astype(np.float32)
        self.centres = centres / np.linalg.norm(centres, axis=1, keepdims=True)

    def _points(self, rng: np.random.Generator, n: int) -> np.ndarray:
        assignment = rng.integers(0, self.clusters, size=n)
        noise = rng.standard_normal((n, self.dim)).astype(np.float32) * (self.spread / np.sqrt(self.dim))
        x = self.centres[assignment] + noise
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    def vectors(self, start: int, stop: int) -> np.ndarray:
        """float32 unit vectors of rows [start, stop)."""
        parts = []
        for chunk in range(start // CHUNK, (stop - 1) // CHUNK + 1 if stop > start else start // CHUNK):
            block = self._points(np.random.default_rng([self.seed, 1, chunk]), CHUNK)
            lo, hi = max(start, chunk * CHUNK), min(stop, (chunk + 1) * CHUNK)
            parts.append(block[lo - chunk * CHUNK : hi - chunk * CHUNK])
        return np.concatenate(parts) if parts else np.empty((0, self.dim), np.float32)

    def queries(self, n: int) -> np.ndarray:
        """Fresh points from the same distribution (not in the catalogue)."""
        return self._points(np.random.default_rng([self.seed, 2]), n)

    def attributes(self, start: int, stop: int) -> list[dict]:
        out = []
        for chunk in range(start // CHUNK, (stop - 1) // CHUNK + 1 if stop > start else start // CHUNK):
            rng = np.random.default_rng([self.seed, 3, chunk])
            price = rng.random(CHUNK) * 100.0
            colour = rng.integers(0, len(COLOURS), CHUNK)
            brand = rng.integers(0, len(BRANDS), CHUNK)
            stock = rng.random(CHUNK) < 0.5
            lo, hi = max(start, chunk * CHUNK), min(stop, (chunk + 1) * CHUNK)
            for j in range(lo - chunk * CHUNK, hi - chunk * CHUNK):
                out.append({"price": float(price[j]), "colour": COLOURS[colour[j]], "brand": BRANDS[brand[j]],
                            "in_stock": bool(stock[j])})
        return out

    def records(self, start: int, stop: int, *, category: str = "default") -> list[Record]:
        vectors = self.vectors(start, stop)
        attributes = self.attributes(start, stop)
        return [Record(image_id=image_id(i), product_id=f"product-{i // 4}", category=category,
                       vector=vectors[i - start], attributes=attributes[i - start]) for i in range(start, stop)]

    def iter_records(self, start: int, stop: int, *, category: str = "default",
                     chunk: int = CHUNK) -> Iterator[Record]:
        for lo in range(start, stop, chunk):
            yield from self.records(lo, min(stop, lo + chunk), category=category)


def image_id(i: int) -> str:
    return f"img-{i:08d}"


def selectivity_filter(selectivity: float) -> Filter:
    """A filter matching about ``selectivity`` of the catalogue, unrelated to the clusters."""
    return Filter(all_of=(Condition(field="price", predicate=Range(max=100.0 * selectivity, exclusive=True)),))


def mixed_filter() -> Filter:
    """colour = colour-3 and in_stock: about 5 %."""
    return Filter(all_of=(Condition(field="colour", predicate=Equals(value=COLOURS[3])),
                          Condition(field="in_stock", predicate=Is(value=True))))


def matches(attributes: dict, flt: Filter) -> bool:
    """Reference evaluation of a filter on one record (for ground truth in tests and benchmarks)."""
    from shard_server.types import AnyOf
    for c in flt.all_of:
        value, p = attributes.get(c.field), c.predicate
        if value is None:
            return False
        if isinstance(p, Equals) and value != p.value:
            return False
        if isinstance(p, AnyOf) and value not in p.values:
            return False
        if isinstance(p, Is) and value != p.value:
            return False
        if isinstance(p, Range):
            if p.min is not None and (value <= p.min if p.exclusive else value < p.min):
                return False
            if p.max is not None and (value >= p.max if p.exclusive else value > p.max):
                return False
    return True


def brute_force_top_k(base: np.ndarray, queries: np.ndarray, k: int,
                      mask: np.ndarray | None = None) -> np.ndarray:
    """Row numbers of the exact top-k inner products (rows outside ``mask`` excluded); -1 pads short lists."""
    scores = queries @ base.T
    if mask is not None:
        scores[:, ~mask] = -np.inf
    kk = min(k, base.shape[0])
    top = np.argpartition(-scores, kk - 1, axis=1)[:, :kk]
    order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1, kind="stable")
    result = np.take_along_axis(top, order, axis=1)
    if mask is not None:
        result = np.where(np.isfinite(np.take_along_axis(scores, result, axis=1)), result, -1)
    return result


def recall_at_k(found: list[list[str]], truth: np.ndarray, k: int) -> float:
    """Mean |found ∩ truth| / |truth| over queries; ``truth`` holds row numbers (-1 = none)."""
    total, hit = 0, 0
    for ids, rows in zip(found, truth):
        expected = {image_id(int(r)) for r in rows[:k] if r >= 0}
        total += len(expected)
        hit += len(expected & set(ids[:k]))
    return hit / total if total else 1.0
