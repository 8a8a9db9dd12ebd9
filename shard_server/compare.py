"""Side-by-side engine comparison on one synthetic data set, in one run.

Engines (each built from the same vectors and attributes, each searched with the same queries):

* ``faiss``: raw faiss in this process, IVF-PQ with exact re-ranking, the shard's parameters (the limit);
* ``shard``: one ``imgsearch-shard`` process over gRPC;
* ``broker-N``: the broker process over N shard processes (vector queries: no embedding, no cache); the
  vectors are split evenly into N categories, each pinned to one shard;
* ``lancedb``: embedded LanceDB, IVF_PQ with the same lists/sub-vectors/bits and refine factor, prefiltered;
* ``milvus``: Milvus Lite (milvus-lite 3.x has IVF_FLAT / IVF_SQ8 / HNSW / FLAT, no IVF_PQ: IVF_SQ8 is used).

For every engine the search knob (nprobe) is swept with single queries, one at a time; recall@10 is measured
against brute-force ground truth. At each target recall (0.90 / 0.95 / 0.99) the cheapest setting that
reaches it is taken and measured again under concurrency. At the 0.95 setting, recall under filters that keep
50 / 10 / 1 / 0.1 % of the vectors is measured against filtered brute force. The result is one JSON file (and
plots).

Run ``python -m shard_server.compare --help``; docs/benchmarks.md has the commands behind the published
numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import faiss
import numpy as np

from imgsearch.serving import DEFAULT_EVENT_LOOP, run_event_loop
from shard_server import synthetic
from shard_server.config import ShardConfig
from shard_server.hop_floor import hop_floor
from shard_server.vectors import inner_products_by_rows

log = logging.getLogger("imgsearch.compare")

TOP_K = 10
DEFAULT_TARGETS = (0.90, 0.95, 0.99)
DEFAULT_SELECTIVITIES = (0.5, 0.1, 0.01, 0.001)
DEFAULT_NPROBES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
ALL_ENGINES = ("faiss", "shard", "broker-1", "broker-2", "broker-4", "lancedb", "milvus")


# ----------------------------------------------------------------------------------------------- data


@dataclass(frozen=True, kw_only=True)
class BenchData:
    """Vectors, queries and attributes; row i of `vectors` is image ``synthetic.image_id(i)``."""

    vectors: np.ndarray  # (n, dim) float32, unit norm
    prices: np.ndarray  # (n,) float64, uniform [0, 100): price < 100*s keeps a fraction s
    colours: tuple[str, ...]
    brands: tuple[str, ...]
    in_stock: np.ndarray  # (n,) bool
    queries: np.ndarray  # (q, dim) float32, unit norm, not in `vectors`
    description: dict

    @property
    def n(self) -> int:
        return int(self.vectors.shape[0])

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    @staticmethod
    def price_limit(selectivity: float) -> float:
        """The bound of ``synthetic.selectivity_filter`` (price < limit)."""
        (condition,) = synthetic.selectivity_filter(selectivity).all_of
        return float(condition.predicate.max)

    def mask(self, selectivity: float | None) -> np.ndarray | None:
        if selectivity is None:
            return None
        return self.prices < self.price_limit(selectivity)


def synthetic_data(*, n: int, dim: int, n_queries: int, seed: int, clusters: int = 0) -> BenchData:
    """The shared deterministic catalogue (shard_server.synthetic), `clusters` = n/100 unless given.

    About 100 vectors per cluster: a point's nearest neighbours are then its cluster mates, as with product
    photos. With ~1000 per cluster (the generator's isotropic 512-d noise makes every mate about equally near)
    recall@10 of any PQ index plateaus far below 0.9 and no engine can be compared at matched recall.
    """
    clusters = clusters or max(16, n // 100)
    catalogue = synthetic.SyntheticCatalogue(dim=dim, clusters=clusters, seed=seed)
    vectors = np.empty((n, dim), dtype=np.float32)
    prices = np.empty(n, dtype=np.float64)
    in_stock = np.empty(n, dtype=bool)
    colours: list[str] = []
    brands: list[str] = []
    step = 65536
    for start in range(0, n, step):
        stop = min(n, start + step)
        vectors[start:stop] = catalogue.vectors(start, stop)
        for j, attrs in enumerate(catalogue.attributes(start, stop), start):
            prices[j] = attrs["price"]
            in_stock[j] = attrs["in_stock"]
            colours.append(attrs["colour"])
            brands.append(attrs["brand"])
    return BenchData(
        vectors=vectors,
        prices=prices,
        colours=tuple(colours),
        brands=tuple(brands),
        in_stock=in_stock,
        queries=catalogue.queries(n_queries),
        description={
            "generator": "shard_server.synthetic.SyntheticCatalogue",
            "n": n,
            "dim": dim,
            "queries": n_queries,
            "clusters": clusters,
            "spread": catalogue.spread,
            "seed": seed,
        },
    )


def grocery_data(data_dir: Path, *, cache: Path | None = None) -> BenchData:
    """Real embeddings: the grocery train photos are the catalogue, the val photos the queries, embedded in
    process by the default ONNX model (embedder.client.OnnxEmbedder, the same model Triton serves). Attributes
    are the catalogue's deterministic ones (broker.catalogue.synthetic_attributes), prices turned into ranks.
    `cache`: an .npz file that keeps the embeddings between runs."""
    from broker.catalogue import grocery_split  # noqa: PLC0415 - the real-data run only
    from embedder.client import OnnxEmbedder  # noqa: PLC0415

    train, val = grocery_split(data_dir, "train"), grocery_split(data_dir, "val")
    if cache is not None and cache.exists():
        stored = np.load(cache)
        vectors, queries = stored["vectors"], stored["queries"]
    else:

        async def embed_all(files) -> np.ndarray:
            embedder = OnnxEmbedder()
            try:
                parts = [
                    await embedder.embed([f.path.read_bytes() for f in files[i : i + 32]], timeout_s=600)
                    for i in range(0, len(files), 32)
                ]
            finally:
                await embedder.close()
            return np.concatenate(parts).astype(np.float32)

        vectors, queries = asyncio.run(embed_all(train)), asyncio.run(embed_all(val))
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            np.savez(cache, vectors=vectors, queries=queries)
    attrs = [f.attributes for f in train]
    # Prices as ranks spread over [0, 100): the synthetic selectivity filters (price < 100*s) then keep the
    # same fractions (the catalogue's own prices start at 1.00: the 1 % and 0.1 % filters would be empty).
    ranks = np.argsort(np.argsort([a["price"] for a in attrs], kind="stable"), kind="stable")
    return BenchData(
        vectors=vectors,
        prices=(ranks + 0.5) * (100.0 / len(attrs)),
        colours=tuple(a["colour"] for a in attrs),
        brands=tuple(a["brand"] for a in attrs),
        in_stock=np.array([a["in_stock"] for a in attrs], dtype=bool),
        queries=queries,
        description={
            "generator": "grocery photos embedded by the default ONNX model "
            "(train = catalogue, val = queries)",
            "n": len(train),
            "dim": int(vectors.shape[1]),
            "queries": len(val),
        },
    )


def attributes_of(data: BenchData, row: int) -> dict:
    return {
        "price": float(data.prices[row]),
        "colour": data.colours[row],
        "brand": data.brands[row],
        "in_stock": bool(data.in_stock[row]),
    }


def row_of(image_id: str) -> int:
    """Inverse of ``synthetic.image_id``."""
    return int(image_id.rsplit("-", 1)[1])


def ground_truth(
    data: BenchData, selectivity: float | None, *, k: int = TOP_K, queries: np.ndarray | None = None
) -> np.ndarray:
    """Exact top-k rows by inner product (brute force), restricted to the filter's rows when given."""
    queries = data.queries if queries is None else queries
    mask = data.mask(selectivity)
    rows = np.arange(data.n) if mask is None else np.flatnonzero(mask)
    index = faiss.IndexFlatIP(data.dim)
    index.add(data.vectors[rows])
    _, found = index.search(queries, k)
    return np.where(found >= 0, rows[np.maximum(found, 0)], -1)


def recall_at_k(found: Sequence[Sequence[int]], truth: np.ndarray) -> float:
    hits = 0
    total = 0
    for got, want in zip(found, truth, strict=True):
        want_set = {int(w) for w in want if w >= 0}
        hits += len(want_set.intersection(int(g) for g in got))
        total += len(want_set)
    return hits / total if total else 1.0


# -------------------------------------------------------------------------------------------- engines


@dataclass(frozen=True, kw_only=True)
class IndexParams:
    """The index parameters every engine gets: the shard's defaults (ShardConfig) for this many vectors."""

    nlist: int
    factory: str  # the shard's faiss factory, e.g. "IVF1789,PQ64x4fs"
    pq_m: int
    pq_bits: int
    rerank_factor: int
    max_rerank_candidates: int
    kmeans_iterations: int
    train_points_per_centroid: int

    @classmethod
    def of_shard(cls, n: int, config: ShardConfig | None = None) -> IndexParams:
        config = config or ShardConfig(data_dir=Path("."))
        nlist = config.nlist_for(n)
        factory = config.factory_for(nlist)
        pq = factory.split(",")[1]  # "PQ64x4fs"
        m, _, bits = pq.removeprefix("PQ").removesuffix("fs").partition("x")
        return cls(
            nlist=nlist,
            factory=factory,
            pq_m=int(m),
            pq_bits=int(bits or 8),
            rerank_factor=config.rerank_factor,
            max_rerank_candidates=getattr(config, "max_rerank_candidates", 1 << 30),
            kmeans_iterations=config.kmeans_iterations,
            train_points_per_centroid=config.max_train_points_per_centroid,
        )


@dataclass(frozen=True, kw_only=True)
class BuildReport:
    build_s: float
    bytes_per_vector: float
    bytes_basis: str  # what the bytes count
    index: str
    disk_bytes_per_vector: float | None = None  # files the engine keeps (None: nothing on disk)


def disk_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and f.suffix != ".log")


class Engine:
    """One engine under test. `build` and `search` are plain functions (search is called from worker threads)
    or, when `is_async`, coroutines run on the benchmark's event loop."""

    name = "engine"
    knob = "nprobe"
    is_async = False

    def __init__(self, params: IndexParams, knobs: Sequence[int]) -> None:
        self.params = params
        self._knobs = tuple(k for k in knobs if k <= params.nlist) or (params.nlist,)

    def knobs(self) -> Sequence[int]:
        return self._knobs

    def build(self, data: BenchData) -> BuildReport:
        raise NotImplementedError

    def search(
        self, query: np.ndarray, knob: int, selectivity: float | None
    ):  # list[int] or an awaitable of it
        raise NotImplementedError

    def close(self) -> None:
        return None


class FaissEngine(Engine):
    """The shard's index in this process and nothing else: the same faiss factory, k-means settings and exact
    re-ranking of top_k * rerank_factor PQ candidates. Filters go in as a plain faiss IDSelectorBitmap at the
    same nprobe (none of the shard's exact-scan / wider-probe strategies for selective filters)."""

    name = "faiss"

    def build(self, data: BenchData) -> BuildReport:
        p = self.params
        started = time.perf_counter()
        index = faiss.index_factory(data.dim, p.factory, faiss.METRIC_INNER_PRODUCT)
        ivf = faiss.extract_index_ivf(index)
        ivf.cp.niter = p.kmeans_iterations
        ivf.cp.max_points_per_centroid = p.train_points_per_centroid
        sample = np.random.default_rng(data.n).choice(
            data.n, min(data.n, p.train_points_per_centroid * p.nlist), replace=False
        )
        index.train(data.vectors[np.sort(sample)])
        index.add(data.vectors)
        build_s = time.perf_counter() - started
        self._index, self._data = index, data
        self._bitmaps: dict[float, np.ndarray] = {}
        codes = len(faiss.serialize_index(index))
        return BuildReport(
            build_s=build_s,
            bytes_per_vector=(codes + data.vectors.nbytes) / data.n,
            bytes_basis="serialized faiss index (codes, ids, centroids) + the float32 vectors for re-ranking",
            index=f"{p.factory} + exact re-rank x{p.rerank_factor}",
        )

    def search(self, query: np.ndarray, knob: int, selectivity: float | None) -> list[int]:
        params = faiss.SearchParametersIVF(nprobe=int(knob))
        if selectivity is not None:
            bitmap = self._bitmaps.get(selectivity)
            if bitmap is None:
                bitmap = self._bitmaps[selectivity] = np.packbits(
                    self._data.mask(selectivity), bitorder="little"
                )
            params.sel = faiss.IDSelectorBitmap(self._data.n, faiss.swig_ptr(bitmap))
        candidates = min(TOP_K * self.params.rerank_factor, self.params.max_rerank_candidates)
        _, labels = self._index.search(query[None, :], candidates, params=params)
        rows = labels[0][labels[0] >= 0]
        scores = inner_products_by_rows(self._data.vectors, rows, query)  # the shard's re-rank, in place
        return rows[np.argsort(-scores, kind="stable")[:TOP_K]].tolist()


class LanceEngine(Engine):
    """Embedded LanceDB: IVF_PQ with the shard's lists, sub-vectors, bits and k-means iterations;
    refine_factor = the shard's re-rank factor; filters are prefilters served by a BTree index on price, with
    Lance's adaptive probing (maximum_nprobes unbounded: more lists while fewer than k rows match)."""

    name = "lancedb"

    def __init__(self, params: IndexParams, knobs: Sequence[int], work_dir: Path) -> None:
        super().__init__(params, knobs)
        self.work_dir = work_dir / "lancedb"

    def build(self, data: BenchData) -> BuildReport:
        # Lance warns on every query that `_distance` will stop being returned by default; we never read it.
        os.environ.setdefault("LANCEDB_LOG", "error")
        import lancedb  # noqa: PLC0415 - the bench extra
        import pyarrow as pa  # noqa: PLC0415
        from lancedb.index import BTree, IvfPq  # noqa: PLC0415

        p = self.params
        self._data = data
        shutil.rmtree(self.work_dir, ignore_errors=True)
        started = time.perf_counter()
        db = lancedb.connect(str(self.work_dir))
        table = pa.table(
            {
                "row": pa.array(np.arange(data.n, dtype=np.int64)),
                "brand": pa.array(data.brands),
                "colour": pa.array(data.colours),
                "price": pa.array(data.prices),
                "in_stock": pa.array(data.in_stock),
                "vector": pa.FixedSizeListArray.from_arrays(pa.array(data.vectors.reshape(-1)), data.dim),
            }
        )
        self._table = db.create_table("vectors", table)
        self._table.create_index(
            "vector",
            config=IvfPq(
                distance_type="dot",
                num_partitions=p.nlist,
                num_sub_vectors=p.pq_m,
                num_bits=p.pq_bits,
                max_iterations=p.kmeans_iterations,
                sample_rate=p.train_points_per_centroid,
            ),
        )
        self._table.create_index("price", config=BTree())
        build_s = time.perf_counter() - started
        size = disk_bytes(self.work_dir)
        return BuildReport(
            build_s=build_s,
            bytes_per_vector=size / data.n,
            disk_bytes_per_vector=size / data.n,
            bytes_basis="files on disk: float32 vectors + attributes + IVF_PQ index + BTree(price)",
            index=f"IVF_PQ(num_partitions={p.nlist}, num_sub_vectors={p.pq_m}, "
            f"num_bits={p.pq_bits}), refine_factor={p.rerank_factor}",
        )

    def search(self, query: np.ndarray, knob: int, selectivity: float | None) -> list[int]:
        q = (
            self._table.search(query, vector_column_name="vector")
            .distance_type("dot")
            .nprobes(int(knob))
            .refine_factor(self.params.rerank_factor)
            .limit(TOP_K)
            .select(["row", "_distance"])  # naming _distance silences lance's per-query deprecation warning
        )
        if selectivity is not None:
            # Lance's own remedy for selective prefilters: probe further lists while fewer than k rows match.
            q = (
                q.where(f"price < {self._data.price_limit(selectivity)!r}", prefilter=True)
                .minimum_nprobes(int(knob))
                .maximum_nprobes(0)
            )
        return q.to_arrow().column("row").to_pylist()


class MilvusEngine(Engine):
    """Milvus Lite (embedded, one local file). milvus-lite 3.x has no IVF_PQ (IVF_FLAT, IVF_SQ8, HNSW, FLAT
    only): IVF_SQ8 with the shard's list count is the nearest compressed IVF index."""

    name = "milvus"

    def __init__(self, params: IndexParams, knobs: Sequence[int], work_dir: Path, index_type: str) -> None:
        super().__init__(params, knobs)
        self.work_dir = work_dir / "milvus"
        self.index_type = index_type

    def build(self, data: BenchData) -> BuildReport:
        from pymilvus import DataType, MilvusClient  # noqa: PLC0415 - the bench extra

        self._data = data
        shutil.rmtree(self.work_dir, ignore_errors=True)
        self.work_dir.mkdir(parents=True)
        started = time.perf_counter()
        client = MilvusClient(str(self.work_dir / "bench.db"))
        schema = client.create_schema(auto_id=False)
        schema.add_field("row", DataType.INT64, is_primary=True)
        schema.add_field("brand", DataType.VARCHAR, max_length=32)
        schema.add_field("colour", DataType.VARCHAR, max_length=32)
        schema.add_field("price", DataType.DOUBLE)
        schema.add_field("in_stock", DataType.BOOL)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=data.dim)
        index_params = client.prepare_index_params()
        # pymilvus 3 flattens `params` into the request while milvus-lite 3.2 reads only a "params" entry (and
        # silently builds nlist=128 otherwise): nest it once more so the list count arrives.
        index_params.add_index(
            field_name="vector",
            index_type=self.index_type,
            metric_type="IP",
            params={"params": {"nlist": self.params.nlist}},
        )
        client.create_collection("vectors", schema=schema, index_params=index_params)
        batch = 10_000
        for start in range(0, data.n, batch):
            client.insert(
                "vectors",
                [
                    {"row": i, **attributes_of(data, i), "vector": data.vectors[i]}
                    for i in range(start, min(data.n, start + batch))
                ],
            )
        client.flush("vectors")
        client.load_collection("vectors")
        deadline = time.monotonic() + 7200
        while True:  # the index is built in the background after the flush
            info = client.describe_index("vectors", "vector")
            if int(info.get("pending_index_rows", 0)) == 0 and info.get("state") == "Finished":
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"Milvus Lite index not built after 2 h: {info}")
            time.sleep(0.2)
        # One search makes every segment's index built or loaded before the clock stops.
        client.search(
            "vectors",
            data=[data.queries[0]],
            limit=TOP_K,
            search_params={"metric_type": "IP", "params": {"nprobe": 1}},
        )
        build_s = time.perf_counter() - started
        self._client = client
        size = disk_bytes(self.work_dir)
        built = client.describe_index("vectors", "vector")  # what the server says it built, not what we asked
        built_params = built.get("params") or {}
        if isinstance(built_params, str):
            built_params = json.loads(built_params)
        built.setdefault("nlist", built_params.get("nlist", "default"))
        return BuildReport(
            build_s=build_s,
            bytes_per_vector=size / data.n,
            disk_bytes_per_vector=size / data.n,
            bytes_basis="files on disk: float32 vectors + attributes + index",
            index=f"{built.get('index_type')}(nlist={built['nlist']})",
        )

    def search(self, query: np.ndarray, knob: int, selectivity: float | None) -> list[int]:
        kwargs = {}
        if selectivity is not None:
            kwargs["filter"] = f"price < {self._data.price_limit(selectivity)!r}"
        result = self._client.search(
            "vectors",
            data=[query],
            limit=TOP_K,
            search_params={"metric_type": "IP", "params": {"nprobe": int(knob)}},
            **kwargs,
        )
        return [int(hit["row"]) for hit in result[0]]

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._client.close()


# ---------------------------------------------------------------------------------------- measurement


@dataclass(frozen=True, kw_only=True)
class Point:
    """One engine at one knob setting."""

    knob: int
    recall: float
    qps: float
    p50_ms: float
    p99_ms: float
    queries: int
    concurrency: int = 1


def _summary(knob: int, latencies_s: list[float], wall_s: float, recall: float, concurrency: int) -> Point:
    lat = np.asarray(latencies_s) * 1000.0
    return Point(
        knob=knob,
        recall=round(recall, 4),
        qps=round(len(lat) / wall_s, 1),
        p50_ms=round(float(np.percentile(lat, 50)), 3),
        p99_ms=round(float(np.percentile(lat, 99)), 3),
        queries=len(lat),
        concurrency=concurrency,
    )


async def run_queries(
    engine: Engine, queries: np.ndarray, knob: int, selectivity: float | None, concurrency: int
) -> tuple[list[list[int]], list[float], float]:
    """Every query once, by `concurrency` closed-loop workers: results, per-query latencies, wall time."""
    results: list[list[int] | None] = [None] * len(queries)
    latencies: list[float] = [0.0] * len(queries)
    next_query = iter(range(len(queries)))

    if engine.is_async:

        async def worker() -> None:
            for i in next_query:
                t0 = time.perf_counter()
                results[i] = await engine.search(queries[i], knob, selectivity)
                latencies[i] = time.perf_counter() - t0

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return results, latencies, time.perf_counter() - started

    def sync_worker() -> None:
        for i in next_query:  # a shared iterator: next() on a range iterator is atomic under the GIL
            t0 = time.perf_counter()
            results[i] = engine.search(queries[i], knob, selectivity)
            latencies[i] = time.perf_counter() - t0

    started = time.perf_counter()
    if concurrency == 1:
        sync_worker()
    else:
        # OpenMP's thread count is per thread in faiss: give the workers this thread's setting.
        with ThreadPoolExecutor(
            concurrency, initializer=faiss.omp_set_num_threads, initargs=(faiss.omp_get_max_threads(),)
        ) as pool:
            futures = [pool.submit(sync_worker) for _ in range(concurrency)]
            for f in futures:
                await asyncio.wrap_future(f)
    return results, latencies, time.perf_counter() - started


@dataclass(kw_only=True)
class EngineResult:
    name: str
    knob: str
    build: dict | None = None
    sweep: list[dict] = field(default_factory=list)
    matched: dict[str, dict] = field(default_factory=dict)
    filtered: dict[str, dict] = field(default_factory=dict)
    profile: dict | None = None
    # full garbage collections in the engine's server processes from the first query to the last (gRPC engines)
    gc: dict | None = None
    error: str | None = None


async def profile_engine(engine: Engine, queries: np.ndarray, knob: int, cfg: CompareConfig) -> dict:
    """py-spy (sampling, non-blocking) on this process and the engine's server processes while `concurrency`
    clients search for `profile_s` seconds; returns the hottest functions of each process."""
    targets = {"client": os.getpid(), **getattr(engine, "profile_targets", dict)()}
    cfg.profile_dir.mkdir(parents=True, exist_ok=True)
    spies = {}
    for proc_name, pid in targets.items():
        out = cfg.profile_dir / f"{engine.name}-{proc_name}.txt"
        spies[proc_name] = (
            out,
            await asyncio.create_subprocess_exec(
                str(Path(sys.executable).parent / "py-spy"),
                "record",
                "--pid",
                str(pid),
                "--duration",
                str(int(cfg.profile_s)),
                "--rate",
                "200",
                "--nonblocking",
                "--format",
                "raw",
                "--output",
                str(out),
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
            ),
        )
    deadline = time.perf_counter() + cfg.profile_s
    rounds = 0
    while time.perf_counter() < deadline:
        await run_queries(engine, queries, knob, None, cfg.concurrency)
        rounds += 1
    summary = {"seconds": cfg.profile_s, "knob": knob, "rounds": rounds, "processes": {}}
    for proc_name, (out, spy) in spies.items():
        await spy.wait()
        if out.exists():
            summary["processes"][proc_name] = {"file": str(out), "top": hottest_functions(out.read_text())}
    return summary


def _frame_name(frame: str) -> str:
    """ "search (/path/to/engine.py:120)" -> "search (engine.py)": one entry per function, not per line."""
    name, sep, where = frame.partition(" (")
    if not sep:
        return frame
    return f"{name} ({where.split(':')[0].rsplit('/', 1)[-1].rstrip(')')})"


def hottest_functions(collapsed: str, *, top: int = 12) -> list[dict]:
    """From py-spy's raw (collapsed) stacks: the functions with the most samples, self and inclusive."""
    total = 0
    inclusive: dict[str, int] = {}
    own: dict[str, int] = {}
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [_frame_name(f) for f in stack.split(";")]
        for frame in set(frames):
            inclusive[frame] = inclusive.get(frame, 0) + n
        own[frames[-1]] = own.get(frames[-1], 0) + n
    if not total:
        return []
    hottest = sorted(own.items(), key=lambda kv: -kv[1])[:top]
    return [
        {
            "function": f,
            "self_pct": round(100 * c / total, 1),
            "inclusive_pct": round(100 * inclusive[f] / total, 1),
        }
        for f, c in hottest
    ]


async def measure_engine(
    engine: Engine,
    data: BenchData,
    truth: np.ndarray,
    filtered_truth: dict[float, np.ndarray],
    cfg: CompareConfig,
) -> EngineResult:
    result = EngineResult(name=engine.name, knob=engine.knob)
    log.info("%s: building on %d vectors", engine.name, data.n)
    build = await asyncio.to_thread(engine.build, data) if not engine.is_async else await engine.build(data)
    result.build = asdict(build)
    log.info(
        "%s: built in %.1fs (%s), %.0f bytes/vector",
        engine.name,
        build.build_s,
        build.index,
        build.bytes_per_vector,
    )
    queries = data.queries
    # Warm-up: caches, lazily loaded index files, gRPC channels.
    await run_queries(engine, queries[: min(20, len(queries))], engine.knobs()[0], None, 1)
    full_collections = getattr(engine, "full_collections", None)
    gc_before = await full_collections() if full_collections else None
    points: list[Point] = []
    for knob in engine.knobs():
        found, lat, wall = await run_queries(engine, queries, knob, None, 1)
        point = _summary(knob, lat, wall, recall_at_k(found, truth), 1)
        points.append(point)
        result.sweep.append(asdict(point))
        log.info(
            "%s: %s=%d recall@10=%.4f qps=%.0f p50=%.2fms p99=%.2fms",
            engine.name,
            engine.knob,
            knob,
            point.recall,
            point.qps,
            point.p50_ms,
            point.p99_ms,
        )
        if point.recall >= cfg.stop_recall:
            break
        if len(points) >= 3 and points[-1].recall - points[-3].recall < 0.002:
            break  # a plateau (quantisation-bound): more lists only cost time
    concurrent: dict[int, Point] = {}
    for target in cfg.targets:
        chosen = next((p for p in points if p.recall >= target), None)
        if chosen is None:
            best = max(points, key=lambda p: p.recall)
            result.matched[f"{target:.2f}"] = {
                "reached": False,
                "best_recall": best.recall,
                "knob": best.knob,
            }
            continue
        if chosen.knob not in concurrent:  # targets often share a setting: measure each setting once
            found, lat, wall = await run_queries(engine, queries, chosen.knob, None, cfg.concurrency)
            concurrent[chosen.knob] = _summary(
                chosen.knob, lat, wall, recall_at_k(found, truth), cfg.concurrency
            )
        conc = concurrent[chosen.knob]
        result.matched[f"{target:.2f}"] = {
            "reached": True,
            "single": asdict(chosen),
            "concurrent": asdict(conc),
        }
        log.info(
            "%s: target %.2f at %s=%d: single %.0f qps, %d-way %.0f qps p50=%.2fms p99=%.2fms",
            engine.name,
            target,
            engine.knob,
            chosen.knob,
            chosen.qps,
            cfg.concurrency,
            conc.qps,
            conc.p50_ms,
            conc.p99_ms,
        )
    matched = result.matched.get(f"{cfg.filter_target:.2f}", {})
    if cfg.profile_s > 0 and cfg.profile_dir is not None and matched.get("reached"):
        result.profile = await profile_engine(engine, queries, matched["single"]["knob"], cfg)
    # Filtered recall at the setting matched to the filter target (or the best one reached).
    at = next((p for p in points if p.recall >= cfg.filter_target), max(points, key=lambda p: p.recall))
    fq = queries[: cfg.filter_queries]
    for selectivity in cfg.selectivities:
        found, lat, wall = await run_queries(engine, fq, at.knob, selectivity, 1)
        point = _summary(at.knob, lat, wall, recall_at_k(found, filtered_truth[selectivity]), 1)
        result.filtered[f"{selectivity:g}"] = asdict(point)
        log.info(
            "%s: selectivity %g at %s=%d: recall@10=%.4f p50=%.2fms",
            engine.name,
            selectivity,
            engine.knob,
            at.knob,
            point.recall,
            point.p50_ms,
        )
    if gc_before is not None:
        during = (await full_collections()).since(gc_before)
        result.gc = during.as_dict()
        log.info("%s: server processes during the measurement: %s", engine.name, during.describe())
    return result


# ------------------------------------------------------------------------------------------------ run


@dataclass(frozen=True, kw_only=True)
class CompareConfig:
    n_vectors: int = 50_000
    dim: int = 512
    n_queries: int = 300
    filter_queries: int = 100
    clusters: int = 0  # 0: n / 100
    seed: int = 0
    engines: tuple[str, ...] = ALL_ENGINES
    nprobes: tuple[int, ...] = DEFAULT_NPROBES
    targets: tuple[float, ...] = DEFAULT_TARGETS
    selectivities: tuple[float, ...] = DEFAULT_SELECTIVITIES
    filter_target: float = 0.95
    # The sweep stops once this recall is reached (higher settings only cost time).
    stop_recall: float = 0.995
    concurrency: int = 8
    # OpenMP threads of this process' faiss, builds included (the shard searches with 1 per query).
    faiss_threads: int = 1
    # Fixed IVF list count for every engine (passed to the shards as --nlist); 0: the shard's sqrt rule.
    nlist: int = 0
    milvus_index: str = "IVF_SQ8"
    # Grocery photos (train = catalogue, val = queries) instead of synthetic vectors; None: synthetic.
    grocery_dir: Path | None = None
    embeddings_cache: Path | None = None
    # py-spy profiles (client, broker, shard) of the recall-0.95 setting under concurrency, this many seconds.
    profile_s: float = 0.0
    profile_dir: Path | None = None
    work_dir: Path | None = None
    out_json: Path = Path("docs/bench/compare.json")
    plot_dir: Path | None = Path("docs/bench")

    @classmethod
    def from_args(cls, argv: list[str] | None = None) -> CompareConfig:
        p = argparse.ArgumentParser(prog="python -m shard_server.compare", description=__doc__.split("\n")[0])
        p.add_argument("--vectors", type=int, default=cls.n_vectors)
        p.add_argument("--dim", type=int, default=cls.dim)
        p.add_argument("--queries", type=int, default=cls.n_queries)
        p.add_argument("--filter-queries", type=int, default=cls.filter_queries)
        p.add_argument("--clusters", type=int, default=0, help="synthetic clusters; 0: vectors / 100")
        p.add_argument("--seed", type=int, default=cls.seed)
        p.add_argument(
            "--engines", default=",".join(ALL_ENGINES), help=f"comma list of {', '.join(ALL_ENGINES)}"
        )
        p.add_argument("--nprobes", default=",".join(map(str, DEFAULT_NPROBES)))
        p.add_argument("--concurrency", type=int, default=cls.concurrency)
        p.add_argument("--faiss-threads", type=int, default=cls.faiss_threads)
        p.add_argument("--nlist", type=int, default=0, help="IVF lists for every engine; 0: the shard's rule")
        p.add_argument(
            "--milvus-index", default=cls.milvus_index, choices=("IVF_SQ8", "IVF_FLAT", "HNSW", "FLAT")
        )
        p.add_argument(
            "--grocery",
            type=Path,
            default=None,
            metavar="DATA_DIR",
            help="real data: embed the grocery photos under DATA_DIR/grocery (e.g. ../shared/data)",
        )
        p.add_argument(
            "--embeddings-cache", type=Path, default=None, help=".npz keeping the grocery embeddings"
        )
        p.add_argument(
            "--profile-s",
            type=float,
            default=0.0,
            help="py-spy the client, broker and shard processes this long at the 0.95 setting",
        )
        p.add_argument("--profile-dir", type=Path, default=Path("docs/bench/profiles"))
        p.add_argument("--work-dir", type=Path, default=None, help="scratch directory (default: a temp dir)")
        p.add_argument("--out", type=Path, default=cls.out_json)
        p.add_argument("--plots", default="docs/bench", help="plot directory; empty for none")
        a = p.parse_args(argv)
        engines = tuple(e.strip() for e in a.engines.split(",") if e.strip())
        unknown = set(engines) - set(ALL_ENGINES)
        if unknown:
            p.error(f"unknown engines: {sorted(unknown)}")
        return cls(
            n_vectors=a.vectors,
            dim=a.dim,
            n_queries=a.queries,
            filter_queries=a.filter_queries,
            clusters=a.clusters,
            seed=a.seed,
            engines=engines,
            nprobes=tuple(int(x) for x in a.nprobes.split(",")),
            concurrency=a.concurrency,
            faiss_threads=a.faiss_threads,
            nlist=a.nlist,
            milvus_index=a.milvus_index,
            grocery_dir=a.grocery,
            embeddings_cache=a.embeddings_cache,
            profile_s=a.profile_s,
            profile_dir=a.profile_dir,
            work_dir=a.work_dir,
            out_json=a.out,
            plot_dir=Path(a.plots) if a.plots else None,
        )


def machine_info() -> dict:
    cpu = platform.processor()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_gib = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        mem_gib = round(int(Path("/proc/meminfo").read_text().split("\n")[0].split()[1]) / 2**20, 1)
    versions = {"python": platform.python_version(), "numpy": np.__version__, "faiss": faiss.__version__}
    for module in ("lancedb", "pymilvus", "milvus_lite", "grpc"):
        with contextlib.suppress(Exception):
            versions[module] = __import__(module).__version__
    return {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)),
        "memory_gib": mem_gib,
        "os": platform.platform(),
        "load_avg_at_start": [round(x, 2) for x in os.getloadavg()],
        "versions": versions,
    }


def shard_config(cfg: CompareConfig) -> ShardConfig:
    """The shard settings of the run: the defaults, with the list count fixed when asked."""
    return ShardConfig(data_dir=Path("."), nlist=cfg.nlist)


def make_engine(name: str, cfg: CompareConfig, params: IndexParams, work_dir: Path, tiers: dict) -> Engine:
    if name == "faiss":
        return FaissEngine(params, cfg.nprobes)
    if name == "lancedb":
        return LanceEngine(params, cfg.nprobes, work_dir)
    if name == "milvus":
        return MilvusEngine(params, cfg.nprobes, work_dir, cfg.milvus_index)
    from shard_server.compare_grpc import ShardTier, ShardTierEngine  # noqa: PLC0415 - gRPC engines only

    shards = 1 if name == "shard" else int(name.removeprefix("broker-"))
    if shards not in tiers:
        tiers[shards] = ShardTier(
            work_dir, shards=shards, search_threads=max(4, cfg.concurrency), config=shard_config(cfg)
        )
    return ShardTierEngine(params, cfg.nprobes, tiers[shards], via_broker=name != "shard")


def _last_users(engines: Sequence[str]) -> dict[int, str]:
    """Shard count -> the last engine in the run that searches that tier (the tier is closed after it)."""
    last = {}
    for name in engines:
        if name == "shard":
            last[1] = name
        elif name.startswith("broker-"):
            last[int(name.removeprefix("broker-"))] = name
    return last


async def run(cfg: CompareConfig, *, on_engine_done=None) -> dict:
    """The whole comparison; `on_engine_done(report)` gets the report so far after every engine."""
    started_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    t_start = time.perf_counter()
    faiss.omp_set_num_threads(cfg.faiss_threads)
    if cfg.grocery_dir is not None:
        # In a worker thread: grocery_data runs its own event loop for the embedder (asyncio.run cannot nest).
        data = await asyncio.to_thread(grocery_data, cfg.grocery_dir, cache=cfg.embeddings_cache)
    else:
        data = synthetic_data(
            n=cfg.n_vectors, dim=cfg.dim, n_queries=cfg.n_queries, seed=cfg.seed, clusters=cfg.clusters
        )
    params = IndexParams.of_shard(data.n, shard_config(cfg))
    log.info("data: %s; index params %s", data.description, params)
    truth = ground_truth(data, None)
    filtered_truth = {
        s: ground_truth(data, s, queries=data.queries[: cfg.filter_queries]) for s in cfg.selectivities
    }
    # The cost of one gRPC hop with no search behind it: the floor under the shard (one hop) and the broker (two).
    hop = await hop_floor(queries=1000, concurrencies=(1, cfg.concurrency))
    log.info("gRPC hop floor (echo shard, no search): %s", hop)
    report = _report_factory(cfg, data, params, started_at, t_start, machine_info(), hop)
    work_dir = cfg.work_dir or Path(tempfile.mkdtemp(prefix="imgsearch-compare-"))
    work_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict] = {}
    tiers: dict = {}
    last_users = _last_users(cfg.engines)
    try:
        for name in cfg.engines:
            engine = make_engine(name, cfg, params, work_dir, tiers)
            try:
                res = await measure_engine(engine, data, truth, filtered_truth, cfg)
            except Exception as exc:  # one engine failing must not lose the others' numbers
                log.exception("%s failed", engine.name)
                res = EngineResult(name=engine.name, knob=engine.knob, error=f"{type(exc).__name__}: {exc}")
            finally:
                engine.close()
                for shards, last in last_users.items():
                    if last == name and shards in tiers:
                        await tiers.pop(shards).close()
            results[engine.name] = asdict(res)
            if on_engine_done is not None:
                on_engine_done(report(results, complete=False))
    finally:
        for tier in tiers.values():
            await tier.close()
        if cfg.work_dir is None:
            shutil.rmtree(work_dir, ignore_errors=True)
    return report(results, complete=True)


def _report_factory(
    cfg: CompareConfig,
    data: BenchData,
    params: IndexParams,
    started_at: str,
    t_start: float,
    machine: dict,
    hop: list[dict],
):
    def report(results: dict, *, complete: bool) -> dict:
        return {
            "kind": "engine-comparison",
            "complete": complete,
            "started_at": started_at,
            "duration_s": round(time.perf_counter() - t_start, 1),
            "command": "python -m shard_server.compare " + " ".join(sys.argv[1:]),
            "machine": {**machine, "load_avg_now": [round(x, 2) for x in os.getloadavg()]},
            "data": data.description,
            "index_params": asdict(params),
            "top_k": TOP_K,
            "concurrency": cfg.concurrency,
            "faiss_threads": cfg.faiss_threads,
            "targets": list(cfg.targets),
            "filter_target": cfg.filter_target,
            "selectivities": list(cfg.selectivities),
            "grpc_hop_floor": hop,
            # the loops of the measuring client and of the shard and broker processes (their env settings)
            "event_loops": {
                "client": type(asyncio.get_running_loop()).__module__.split(".")[0],
                "shard": os.environ.get("IMGSEARCH_SHARD_EVENT_LOOP", DEFAULT_EVENT_LOOP),
                "broker": os.environ.get("IMGSEARCH_EVENT_LOOP", DEFAULT_EVENT_LOOP),
            },
            # grpc's I/O engine in every process of the run (inherited; see imgsearch.grpc_core)
            "grpc_experiments": os.environ.get("GRPC_EXPERIMENTS", ""),
            "engines": dict(results),
        }

    return report


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    cfg = CompareConfig.from_args(argv)
    cfg.out_json.parent.mkdir(parents=True, exist_ok=True)

    def write(
        report: dict,
    ) -> None:  # after every engine too, so a long run that is cut short keeps its numbers
        cfg.out_json.write_text(json.dumps(report, indent=2) + "\n")

    # The measuring client's loop: asyncio unless IMGSEARCH_EVENT_LOOP says otherwise, like the broker's.
    event_loop = os.environ.get("IMGSEARCH_EVENT_LOOP", DEFAULT_EVENT_LOOP)
    report = run_event_loop(run(cfg, on_engine_done=write), event_loop=event_loop)
    write(report)
    log.info("wrote %s", cfg.out_json)
    if cfg.plot_dir is not None:
        from shard_server.compare_plots import plot_comparison  # noqa: PLC0415 - matplotlib only here

        for path in plot_comparison(report, cfg.plot_dir, stem=cfg.out_json.stem):
            log.info("wrote %s", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
