"""Shard server configuration: a frozen dataclass read from command-line flags and IMGSEARCH_SHARD_* variables.

Flags win over environment variables, which win over the defaults below.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

from imgsearch.serving import DEFAULT_EVENT_LOOP, ServerOptions, check_event_loop
from shard_server.errors import InvalidRequestError

ATTRIBUTE_KINDS = ("text", "number", "flag")
DEFAULT_ATTRIBUTE_SCHEMA = "brand:text,colour:text,price:number,in_stock:flag"
ENV_PREFIX = "IMGSEARCH_SHARD_"
MAX_LOG_FRAME_BYTES = (1 << 32) - 2  # the log stores a frame's length in 32 bits; one byte is the op code


def parse_attribute_schema(spec: str) -> tuple[tuple[str, str], ...]:
    """``"brand:text,price:number"`` -> ``(("brand", "text"), ("price", "number"))``."""
    schema: list[tuple[str, str]] = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, kind = item.partition(":")
        name, kind = name.strip(), kind.strip()
        if not name or kind not in ATTRIBUTE_KINDS:
            raise ValueError(f"bad attribute schema entry {item!r}: expected name:{'|'.join(ATTRIBUTE_KINDS)}")
        if any(name == n for n, _ in schema):
            raise ValueError(f"attribute {name!r} declared twice")
        schema.append((name, kind))
    return tuple(schema)


@dataclass(frozen=True, kw_only=True)
class ShardConfig:
    data_dir: Path
    host: str = "127.0.0.1"
    port: int = 0
    metrics_port: int | None = None  # None: no /metrics endpoint; 0: a free port
    dimension: int = 512
    # "{nlist}" is replaced by the partition's list count when it is trained.
    index_factory: str = "IVF{nlist},PQ64x4fs"
    # Fixed list count; 0 derives it from the partition size: nlist_per_sqrt_n * sqrt(n), capped so that every
    # list gets train_points_per_centroid training points (n / 39 lists while n < ~24k).
    nlist: int = 0
    nlist_per_sqrt_n: float = 4.0
    nprobe: int = 16
    max_nprobe: int = 1024
    # PQ candidates re-ranked with the exact vectors: top_k * rerank_factor, at most max_rerank_candidates.
    # 4-bit fast-scan codes rank near neighbours coarsely: on the 1M synthetic benchmark recall@10 is 0.69 with
    # 200 candidates, 0.88 with 400 and 0.99 with 800 (docs/bench-shard.md), whatever nprobe.
    rerank_factor: int = 80
    # Exact vectors for the re-rank and exact scans, memory-mapped from the snapshot: "float32" (2 KB/vector of
    # disk and page cache at 512-d) or "float16" (half, but the conversion makes the re-rank ~1 ms slower).
    vector_dtype: str = "float32"
    max_rerank_candidates: int = 4096
    # A partition with a derived nlist is trained once it holds min_train_rows vectors (with a fixed nlist: once
    # it holds train_points_per_centroid * nlist). Below ~10k rows an exact scan costs little more than IVF-PQ
    # plus the re-rank and has recall 1; above, it grows linearly (`python -m shard_server.small_partition`, in
    # process, one thread, default nprobe 16: exact p50 0.47 ms at 5k rows vs 0.31 ms for IVF128 at recall
    # 0.954; 0.89 ms at 10k vs 0.35 ms for IVF256; 1.06 ms at 12.5k vs 0.35 ms for IVF320).
    min_train_rows: int = 10_000
    train_points_per_centroid: int = 39
    # ...and k-means sees at most this many points per centroid (a sample; keeps training time bounded).
    max_train_points_per_centroid: int = 64
    kmeans_iterations: int = 15
    # A trained partition is rebuilt in the background (larger nlist) once it has grown by this factor.
    retrain_growth_factor: float = 4.0
    # Filters matching at most this many vectors are answered by an exact scan of just those vectors (recall 1,
    # ~1.4 us per float16 row). Above it, a wide IVF probe: on 300k synthetic vectors a 1 % filter (3k rows)
    # through IVF probing nprobe/selectivity lists gave recall@10 0.963 at 10 ms p50; exact is both better and
    # cheaper up to ~10k rows.
    exact_scan_max_rows: int = 12_000
    # Filters matching less than this fraction of a partition probe more lists (nprobe / selectivity), so the
    # probed lists hold as many matching candidates as an unfiltered search sees (at 50 % and nprobe 16 of 283
    # lists, plain IVF had recall@10 0.94 on the synthetic data; widened, 1.0).
    wide_probe_below_selectivity: float = 0.9
    # ...starting from at least this many lists before dividing by the selectivity: the filtered top-k lie
    # farther out than the unfiltered top-k. 1M synthetic vectors, 4,000 lists, 10 % filter
    # (`python -m shard_server.filter_probe`, float32 vectors): floor 16 -> recall@10 0.942 (2.8 ms),
    # 32 -> 0.957 (3.7 ms), 64 -> 0.962 (5.0 ms).
    filtered_nprobe_floor: int = 32
    # The broker's limit (1,000) plus one: a search by image id asks for one more hit, the image itself, left out.
    max_top_k: int = 1001
    max_records_per_request: int = 10_000
    # How long a versioned delete is remembered (a tombstone), so that an older write of the id arriving after it
    # (another broker's, or one replica's late copy) is dropped: longer than a write stays in flight (a broker
    # takes the version right before its shard calls, which get at most its ingest deadline, 60 s by default),
    # with room for the brokers' clock skew. Measured on the write versions, not on this shard's clock. Every
    # ingest sends its ids to every shard that does not own them, so each shard keeps ~ (cluster-wide ingests
    # per second x this) tombstones, about 160 bytes each.
    tombstone_ttl_s: float = 120.0
    # Tombstones held at most (~160 bytes each): a versioned delete that would hold more is refused with
    # RESOURCE_EXHAUSTED (retry once older ones expired). Every id of a versioned delete is remembered, held here or
    # not: five deletes of a million unknown ids took a shard from 594 to 1,248 MB, and at the rate one client can
    # send them the 120 s window held ~17 million (2.3 GB) against a 4 GiB pod (review of 2026-12-06).
    max_tombstones: int = 2_000_000
    # Write versions (the brokers' wall clocks, ns) more than this ahead of the shard's clock are refused: one far
    # in the future would keep every later write of its id out, each still answered OK. Well below
    # tombstone_ttl_s: remembered deletes expire by the newest write version, so a write that far ahead would
    # forget them all.
    max_version_ahead_s: float = 30.0
    # Searches in one SearchBatch call (the broker's batches hold the searches queued behind one call).
    max_batch_searches: int = 256
    max_stream_bytes: int = 1 << 30
    snapshot_interval_s: float = 600.0
    # A snapshot is also taken once the write-ahead log grows past this size.
    snapshot_wal_bytes: int = 1 << 30
    # Searches run on the gRPC event loop itself instead of a search thread, except exhaustive (EXACT) ones.
    # Handing each search to a thread and back costs a thread wake-up, a loop wake-up and GIL hand-overs that
    # outweigh the parallelism the thread pool buys (faiss and numpy release the GIL only for a fraction of a
    # ~0.3 ms search): 200k synthetic vectors on the 2-core box, one shard over gRPC, p50 1.73 -> 1.49 ms,
    # 1 client 476 -> 531 searches/s, 8 clients 964 -> 1,110 (`IMGSEARCH_SHARD_INLINE_SEARCH=false|true
    # python -m shard_server.compare --vectors 200000 --engines shard,broker-1`, docs/benchmarks.md).
    # A search that turns out to need a long exact scan (more than exact_scan_max_rows rows scored one by one:
    # an unindexed partition, or the rare exact fallback of an IVF search) is handed to the pool even so.
    # Off: every search goes to the search_threads pool (a shard that mostly runs long exact scans).
    inline_search: bool = True
    search_threads: int = 4
    write_threads: int = 4
    # 0: OpenMP's default (OMP_NUM_THREADS if set, else every core of the host); deploy/ sets the CPU limit.
    train_threads: int = 0
    max_message_bytes: int = 64 * 1024 * 1024
    shutdown_grace_s: float = 10.0
    max_search_streams: int = ServerOptions.max_search_streams  # SearchStream calls open at once (see ServerOptions)
    # TLS: this server's certificate and key (both, or neither: plaintext), and for mutual TLS the CA whose client
    # certificates are accepted (the brokers': --shard-tls-cert-file there).
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_client_ca_file: Path | None = None
    # "asyncio" or "uvloop": the event loop main() runs the server on (imgsearch.serving.run_event_loop).
    event_loop: str = DEFAULT_EVENT_LOOP
    attribute_schema: tuple[tuple[str, str], ...] = field(
        default_factory=lambda: parse_attribute_schema(DEFAULT_ATTRIBUTE_SCHEMA)
    )

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and not 0 <= value < math.inf:
                # NaN or infinite intervals and timeouts disabled what they set (a NaN snapshot interval: no timed
                # snapshot ever), and a negative count or size meant nothing (review of 2026-12-05)
                raise ValueError(f"{f.name} must be a finite number >= 0, got {value}")
        if self.dimension <= 0:
            raise ValueError("dimension must be positive")
        if self.nprobe <= 0 or self.rerank_factor <= 0 or self.max_top_k <= 0 or self.max_batch_searches <= 0:
            raise ValueError("nprobe, rerank_factor, max_top_k and max_batch_searches must be positive")
        if not 0 < self.max_stream_bytes <= MAX_LOG_FRAME_BYTES:
            # a stream is logged as one frame, whose length the log stores in 32 bits
            raise ValueError(f"max_stream_bytes must be in 1..{MAX_LOG_FRAME_BYTES}, got {self.max_stream_bytes}")
        if not 0 < self.max_version_ahead_s < self.tombstone_ttl_s:
            raise ValueError(f"max_version_ahead_s must be in (0, tombstone_ttl_s = {self.tombstone_ttl_s}), got "
                             f"{self.max_version_ahead_s}")
        if self.max_tombstones < 1:
            raise ValueError(f"max_tombstones must be at least 1, got {self.max_tombstones}")
        if self.vector_dtype not in ("float32", "float16"):
            raise ValueError(f"vector_dtype must be float32 or float16, got {self.vector_dtype!r}")
        check_event_loop(self.event_loop)
        self.server_options()  # raises on half a TLS setting

    def server_options(self) -> ServerOptions:
        return ServerOptions(host=self.host, port=self.port, metrics_port=self.metrics_port,
                             max_message_bytes=self.max_message_bytes, shutdown_grace_s=self.shutdown_grace_s,
                             max_search_streams=self.max_search_streams,
                             tls_cert_file=self.tls_cert_file, tls_key_file=self.tls_key_file,
                             tls_client_ca_file=self.tls_client_ca_file)

    @property
    def attribute_kinds(self) -> Mapping[str, str]:
        return dict(self.attribute_schema)

    def nlist_for(self, n: int) -> int:
        if self.nlist > 0:
            return self.nlist
        by_size = round(self.nlist_per_sqrt_n * math.sqrt(max(n, 1)))
        return max(1, min(by_size, n // self.train_points_per_centroid))

    def training_threshold(self) -> int:
        """Vectors a partition needs before its IVF index is trained."""
        if self.nlist > 0:
            return self.train_points_per_centroid * self.nlist
        return max(self.min_train_rows, self.train_points_per_centroid)

    def factory_for(self, nlist: int) -> str:
        return self.index_factory.replace("{nlist}", str(nlist))

    @classmethod
    def from_env(cls, argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> ShardConfig:
        """Read flags (``--data-dir``, ``--port`` ...) over ``IMGSEARCH_SHARD_*`` variables over defaults."""
        env = os.environ if env is None else env
        parser = argparse.ArgumentParser(prog="imgsearch-shard", description="imgsearch shard server")
        for f in fields(cls):
            flag = "--" + f.name.replace("_", "-")
            parser.add_argument(flag, dest=f.name, default=env.get(ENV_PREFIX + f.name.upper()),
                                help=f"(env {ENV_PREFIX}{f.name.upper()})")
        args = vars(parser.parse_args(list(argv) if argv is not None else []))
        if args["data_dir"] is None:
            raise SystemExit("imgsearch-shard: --data-dir (or IMGSEARCH_SHARD_DATA_DIR) is required")
        values: dict[str, object] = {}
        for f in fields(cls):
            raw = args[f.name]
            if raw is None:
                continue
            try:
                values[f.name] = _coerce(f.name, raw)
            except ValueError as exc:
                parser.error(f"--{f.name.replace('_', '-')}: {exc}")
        try:
            return cls(**values)
        except ValueError as exc:
            parser.error(str(exc))


def _coerce(name: str, raw: str) -> object:
    if name == "data_dir":
        return Path(raw)
    if name in ("tls_cert_file", "tls_key_file", "tls_client_ca_file"):
        return Path(raw) if raw else None
    if name == "attribute_schema":
        return parse_attribute_schema(raw)
    if name in ("host", "index_factory", "vector_dtype", "event_loop"):
        return raw
    if name == "metrics_port":
        return None if raw.lower() in ("", "none", "off") else int(raw)
    default = {f.name: f.default for f in fields(ShardConfig)}[name]
    if isinstance(default, bool):
        if raw.lower() not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            raise ValueError(f"{name}: expected true or false, got {raw!r}")
        return raw.lower() in ("1", "true", "yes", "on")
    if isinstance(default, float):
        return float(raw)
    if isinstance(default, int):
        return int(raw)
    raise InvalidRequestError(f"unknown setting {name}")  # pragma: no cover
