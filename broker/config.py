"""Broker configuration: a frozen dataclass built from flags with environment-variable defaults."""

from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass
from pathlib import Path

from broker.routing import ShardMap
from imgsearch.serving import DEFAULT_EVENT_LOOP, EVENT_LOOPS, ServerOptions

DEFAULT_MAX_IMAGE_BYTES = 10 * 1024 * 1024
DEFAULT_MAX_IMAGE_PIXELS = 40_000_000


@dataclass(frozen=True, kw_only=True)
class BrokerConfig:
    server: ServerOptions
    shard_map: ShardMap
    triton_url: str = "127.0.0.1:8001"
    triton_model: str = "imgsearch"
    # None: no duplicate cache at all (every search goes to the index).
    redis_url: str | None = None
    # Where the removal journal (broker/hint_journal.py) is kept; None: in redis_url's Redis. The journal is state,
    # not a cache: give it a Redis that neither evicts nor forgets (deploy/base/redis-journal: noeviction, AOF).
    journal_redis_url: str | None = None
    # Redis is an optimisation: it gets a short leash, and the search goes on without it.
    redis_timeout_s: float = 0.05
    # After a Redis failure the cache is bypassed for this long instead of paying the timeout on every call.
    redis_backoff_s: float = 1.0
    cache_repair_interval_s: float = 1.0
    # Deadline used when the caller sets none, and the cap on a longer one.
    search_timeout_s: float = 2.0
    ingest_timeout_s: float = 60.0
    embed_max_batch: int = 32
    # Concurrent chunks of a bulk ingest stream (each chunk is one embedding batch and one shard upsert).
    ingest_concurrency: int = 4
    # Upload bytes of IngestStream chunks held at once across all streams (a chunk waits, and its stream stops
    # reading, until there is room): 4 chunks of 32 images of up to 10 MiB per stream held ~1.6 GB otherwise.
    max_ingest_bytes_in_flight: int = 128 * 1024 * 1024
    # IngestStreams running at once (each also holds the chunk it is filling, up to 8 MiB, and one message); more
    # wait for a turn within their deadline, then RESOURCE_EXHAUSTED.
    max_ingest_streams: int = 8
    ingest_chunk_size: int = 32
    dimension: int = 512
    max_top_k: int = 1000
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    # Pixels decoded at once across all calls (broker.decode_budget; ~12 bytes each at the peak); None: one image
    # of max_image_pixels, ~500 MB, which fits the broker's 1 GiB limit in deploy/ with room to spare.
    max_decoding_pixels: int | None = None
    # Near-duplicate rule (pHash AND dHash within these Hamming radii), confirmed by embedding similarity.
    near_phash_radius: int = 5
    near_dhash_radius: int = 5
    # Between edited copies of a photo (min 0.855) and other photos of the same product (max 0.794) with the
    # shipped model: `python -m broker.near_threshold --photos 20`. Re-measure when the model changes.
    near_min_similarity: float = 0.82
    # Bearer token required in the `authorization` metadata of Ingest/IngestStream/Delete; None: open.
    write_token: str | None = None
    # CA certificate to verify the shards' TLS certificates; None: plaintext to the shards.
    shard_tls_ca_file: Path | None = None
    # The broker's own certificate and key for shards that require mutual TLS (--tls-client-ca-file on the shards).
    shard_tls_cert_file: Path | None = None
    shard_tls_key_file: Path | None = None
    health_check_interval_s: float = 1.0
    # While serving, how often the shards' reachability is checked again (imgsearch_broker_shards_unreachable).
    shard_health_interval_s: float = 5.0
    # At start, health waits this long at most for Triton and every shard; then one reachable shard will do
    # (broker.server._serve_when_ready).
    ready_wait_s: float = 30.0
    # Calls in flight to one shard replica before further searches queue and leave together as one SearchBatch
    # when a call returns (broker.coalesce); 0: no queueing, every search its own call.
    shard_calls_in_flight: int = 1
    # At most this many searches per SearchBatch call (the shards accept up to their max_batch_searches, 256).
    shard_batch_max_searches: int = 64
    # Searches travel over long-lived SearchStream calls to the shards (a message on an open stream costs a third
    # of a unary call in gRPC Python; docs/benchmarks.md); off: one unary call per search or batch.
    shard_search_streams: bool = True

    def __post_init__(self) -> None:
        """Refuses settings that would quietly break the service (review of 2026-12-05): `--ingest-concurrency 0`
        hung every IngestStream, `--redis-timeout-s 0` turned the cache off, a NaN similarity never confirmed a
        near duplicate, a negative search timeout failed every search without a deadline."""
        for name in ("redis_timeout_s", "redis_backoff_s", "cache_repair_interval_s", "search_timeout_s",
                     "ingest_timeout_s", "health_check_interval_s", "shard_health_interval_s", "embed_max_batch",
                     "ingest_concurrency", "max_ingest_bytes_in_flight", "max_ingest_streams", "ingest_chunk_size",
                     "dimension", "max_top_k", "max_image_bytes", "max_image_pixels", "shard_batch_max_searches"):
            value = getattr(self, name)
            if not 0 < value < math.inf:
                raise ValueError(f"{name} must be a finite number > 0, got {value}")
        for name in ("ready_wait_s", "shard_calls_in_flight", "near_phash_radius", "near_dhash_radius"):
            value = getattr(self, name)
            if not 0 <= value < math.inf:
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")
        if self.max_decoding_pixels is not None and self.max_decoding_pixels <= 0:
            raise ValueError(f"max_decoding_pixels must be > 0, got {self.max_decoding_pixels}")
        if not -1 <= self.near_min_similarity <= 1:
            raise ValueError(f"near_min_similarity must be in [-1, 1], got {self.near_min_similarity}")

    @property
    def removal_journal_url(self) -> str | None:
        """The Redis of the removal journal: journal_redis_url, else the cache's; None: no journal."""
        return self.journal_redis_url or self.redis_url

    @classmethod
    def from_env(cls, argv: list[str] | None = None) -> BrokerConfig:
        env = os.environ.get
        p = argparse.ArgumentParser(prog="imgsearch-broker", description="imgsearch broker gRPC service")
        p.add_argument("--host", default=env("IMGSEARCH_BROKER_HOST", "127.0.0.1"))
        p.add_argument("--port", type=int, default=int(env("IMGSEARCH_BROKER_PORT", "7100")))
        p.add_argument(
            "--metrics-port",
            type=int,
            default=_opt_int(env("IMGSEARCH_BROKER_METRICS_PORT", "9100")),
            help="Prometheus /metrics port; -1 disables it, 0 picks a free one",
        )
        p.add_argument(
            "--shard-map",
            default=env("IMGSEARCH_SHARD_MAP"),
            help="shard map: path to a YAML/JSON file, or inline JSON",
        )
        p.add_argument("--triton-url", default=env("IMGSEARCH_TRITON_URL", "127.0.0.1:8001"))
        p.add_argument("--triton-model", default=env("IMGSEARCH_TRITON_MODEL", "imgsearch"))
        p.add_argument(
            "--redis-url",
            default=env("REDIS_URL") or None,
            help="redis://host:port/db for the duplicate cache; unset: no cache",
        )
        p.add_argument(
            "--journal-redis-url",
            default=env("IMGSEARCH_JOURNAL_REDIS_URL") or None,
            help="redis://host:port/db for the journal of pending stale-copy removals (state: a Redis without "
            "eviction, with persistence); unset: the --redis-url Redis",
        )
        p.add_argument(
            "--redis-timeout-s", type=float, default=float(env("IMGSEARCH_REDIS_TIMEOUT_S", "0.05"))
        )
        p.add_argument(
            "--search-timeout-s", type=float, default=float(env("IMGSEARCH_SEARCH_TIMEOUT_S", "2.0"))
        )
        p.add_argument(
            "--ingest-timeout-s", type=float, default=float(env("IMGSEARCH_INGEST_TIMEOUT_S", "60"))
        )
        p.add_argument(
            "--ingest-concurrency", type=int, default=int(env("IMGSEARCH_INGEST_CONCURRENCY", "4"))
        )
        p.add_argument(
            "--max-ingest-bytes-in-flight",
            type=int,
            default=int(env("IMGSEARCH_MAX_INGEST_BYTES_IN_FLIGHT", str(cls.max_ingest_bytes_in_flight))),
            help="upload bytes of IngestStream chunks held at once across all streams",
        )
        p.add_argument(
            "--max-ingest-streams",
            type=int,
            default=int(env("IMGSEARCH_MAX_INGEST_STREAMS", str(cls.max_ingest_streams))),
            help="IngestStreams run at once; more wait for a turn within their deadline",
        )
        p.add_argument("--dimension", type=int, default=int(env("IMGSEARCH_DIMENSION", "512")))
        p.add_argument(
            "--max-image-bytes",
            type=int,
            default=int(env("IMGSEARCH_MAX_IMAGE_BYTES", str(DEFAULT_MAX_IMAGE_BYTES))),
        )
        p.add_argument(
            "--max-image-pixels",
            type=int,
            default=int(env("IMGSEARCH_MAX_IMAGE_PIXELS", str(DEFAULT_MAX_IMAGE_PIXELS))),
        )
        p.add_argument(
            "--max-decoding-pixels",
            type=int,
            default=_opt_int(env("IMGSEARCH_MAX_DECODING_PIXELS", "")),
            help="pixels decoded at once across all calls (default: --max-image-pixels)",
        )
        p.add_argument(
            "--max-message-bytes",
            type=int,
            default=int(env("IMGSEARCH_MAX_MESSAGE_BYTES", str(16 * 1024 * 1024))),
        )
        p.add_argument(
            "--near-min-similarity", type=float, default=float(env("IMGSEARCH_NEAR_MIN_SIMILARITY", str(cls.near_min_similarity)))
        )
        p.add_argument(
            "--write-token-file",
            default=env("IMGSEARCH_WRITE_TOKEN_FILE"),
            help="file holding the bearer token required for writes (or IMGSEARCH_WRITE_TOKEN)",
        )
        p.add_argument("--tls-cert-file", default=env("IMGSEARCH_TLS_CERT_FILE"))
        p.add_argument("--tls-key-file", default=env("IMGSEARCH_TLS_KEY_FILE"))
        p.add_argument("--tls-client-ca-file", default=env("IMGSEARCH_TLS_CLIENT_CA_FILE"))
        p.add_argument("--shard-tls-ca-file", default=env("IMGSEARCH_SHARD_TLS_CA_FILE"))
        # IMGSEARCH_BROKER_*, not IMGSEARCH_SHARD_TLS_CERT_FILE: that is the shards' own server certificate
        # (ShardConfig reads IMGSEARCH_SHARD_*), and `imgsearch up` hands one environment to every process.
        p.add_argument("--shard-tls-cert-file", default=env("IMGSEARCH_BROKER_SHARD_TLS_CERT_FILE"),
                       help="client certificate for shards that require mutual TLS")
        p.add_argument("--shard-tls-key-file", default=env("IMGSEARCH_BROKER_SHARD_TLS_KEY_FILE"))
        p.add_argument(
            "--ready-wait-s", type=float, default=float(env("IMGSEARCH_READY_WAIT_S", str(cls.ready_wait_s))),
            help="at start, wait this long at most for Triton and every shard before serving with one shard",
        )
        p.add_argument(
            "--shutdown-grace-s", type=float, default=float(env("IMGSEARCH_SHUTDOWN_GRACE_S", "10"))
        )
        p.add_argument(
            "--max-search-streams", type=int,
            default=int(env("IMGSEARCH_MAX_SEARCH_STREAMS", str(ServerOptions.max_search_streams))),
            help="SearchStream calls open at once; more are refused (RESOURCE_EXHAUSTED) and our clients then "
                 "send unary Search calls",
        )
        p.add_argument(
            "--shard-calls-in-flight",
            type=int,
            default=int(env("IMGSEARCH_SHARD_CALLS_IN_FLIGHT", str(cls.shard_calls_in_flight))),
            help="calls in flight per shard replica before searches queue into batches; 0: never batch",
        )
        p.add_argument(
            "--shard-batch-max-searches",
            type=int,
            default=int(env("IMGSEARCH_SHARD_BATCH_MAX_SEARCHES", str(cls.shard_batch_max_searches))),
        )
        p.add_argument(
            "--shard-search-streams",
            action=argparse.BooleanOptionalAction,
            default=_bool("IMGSEARCH_SHARD_SEARCH_STREAMS", env("IMGSEARCH_SHARD_SEARCH_STREAMS"),
                          cls.shard_search_streams),
            help="send searches to the shards over long-lived streams (cheaper than a call each)",
        )
        p.add_argument(
            "--event-loop", choices=EVENT_LOOPS, default=env("IMGSEARCH_EVENT_LOOP", DEFAULT_EVENT_LOOP)
        )
        a = p.parse_args(argv)
        if not a.shard_map:
            p.error("a shard map is required (--shard-map or IMGSEARCH_SHARD_MAP)")
        # stripped as the file's is, and as the clients strip theirs: a variable set from a file ends in a newline,
        # and no client could then write (review of 2026-12-06)
        token = (env("IMGSEARCH_WRITE_TOKEN") or "").strip() or None
        if a.write_token_file:
            token = Path(a.write_token_file).read_text().strip()
            if not token:  # read as "no token", the broker ran open to writes (review of 2026-12-06)
                p.error(f"--write-token-file {a.write_token_file} holds no token")
        if token is not None and not (token.isascii() and token.isprintable()):
            # gRPC metadata carries printable ASCII only, and the clients refuse anything else: no write could pass
            p.error("the write token must be printable ASCII")
        if bool(a.shard_tls_cert_file) != bool(a.shard_tls_key_file):
            p.error("--shard-tls-cert-file and --shard-tls-key-file go together")
        if a.shard_tls_cert_file and not a.shard_tls_ca_file:
            p.error("--shard-tls-cert-file (mutual TLS to the shards) needs --shard-tls-ca-file")
        try:
            server = _server_options(a)
        except ValueError as exc:
            p.error(str(exc))
        try:
            return cls(
                server=server,
                shard_map=ShardMap.load(a.shard_map),
                triton_url=a.triton_url,
                triton_model=a.triton_model,
                redis_url=a.redis_url,
                journal_redis_url=a.journal_redis_url,
                redis_timeout_s=a.redis_timeout_s,
                search_timeout_s=a.search_timeout_s,
                ingest_timeout_s=a.ingest_timeout_s,
                ingest_concurrency=a.ingest_concurrency,
                max_ingest_bytes_in_flight=a.max_ingest_bytes_in_flight,
                max_ingest_streams=a.max_ingest_streams,
                dimension=a.dimension,
                max_image_bytes=a.max_image_bytes,
                max_image_pixels=a.max_image_pixels,
                max_decoding_pixels=a.max_decoding_pixels,
                near_min_similarity=a.near_min_similarity,
                write_token=token,
                shard_tls_ca_file=_opt_path(a.shard_tls_ca_file),
                shard_tls_cert_file=_opt_path(a.shard_tls_cert_file),
                shard_tls_key_file=_opt_path(a.shard_tls_key_file),
                ready_wait_s=a.ready_wait_s,
                shard_calls_in_flight=a.shard_calls_in_flight,
                shard_batch_max_searches=a.shard_batch_max_searches,
                shard_search_streams=a.shard_search_streams,
            )
        except ValueError as exc:
            p.error(str(exc))


def _server_options(a: argparse.Namespace) -> ServerOptions:
    return ServerOptions(
        host=a.host,
        port=a.port,
        metrics_port=None if a.metrics_port is None or a.metrics_port < 0 else a.metrics_port,
        max_message_bytes=a.max_message_bytes,
        shutdown_grace_s=a.shutdown_grace_s,
        max_search_streams=a.max_search_streams,
        tls_cert_file=_opt_path(a.tls_cert_file),
        tls_key_file=_opt_path(a.tls_key_file),
        tls_client_ca_file=_opt_path(a.tls_client_ca_file),
        event_loop=a.event_loop,
    )


def _bool(name: str, raw: str | None, default: bool) -> bool:
    if raw is None or raw == "":
        return default
    if raw.lower() not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        raise SystemExit(f"{name}: expected true or false, got {raw!r}")
    return raw.lower() in ("1", "true", "yes", "on")


def _opt_int(text: str | None) -> int | None:
    return None if text in (None, "") else int(text)


def _opt_path(text: str | None) -> Path | None:
    return Path(text) if text else None
