"""`imgsearch-broker`: the broker gRPC server (also startable in-process with :func:`start_broker`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from broker import metrics
from broker.cache import DuplicateCache
from broker.config import BrokerConfig
from broker.core import Broker
from broker.fanout import ShardPool
from broker.hint_journal import HintJournal
from broker.repair import CacheRepairQueue
from broker.service import BrokerService
from imgsearch.gc_pauses import freeze_startup_objects
from imgsearch.serving import GrpcService, run_event_loop, run_until_signalled, start_grpc_service
from imgsearch.v1 import broker_pb2, broker_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = broker_pb2.DESCRIPTOR.services_by_name["BrokerService"].full_name


@dataclass
class BrokerHandle:
    service: GrpcService
    broker: Broker
    _stop_hooks: list[Callable]

    @property
    def port(self) -> int:
        return self.service.port

    @property
    def metrics_port(self) -> int | None:
        return self.service.metrics_port

    async def stop(self, grace_s: float | None = None) -> None:
        await self.service.stop(grace_s)
        await self.close()

    async def close(self) -> None:
        for hook in reversed(self._stop_hooks):
            with contextlib.suppress(Exception):
                await hook()


def _default_embedder(config: BrokerConfig):
    from embedder.client import TritonEmbedder

    return TritonEmbedder(config.triton_url, model_name=config.triton_model, max_batch=config.embed_max_batch)


async def start_broker(config: BrokerConfig, *, embedder=None) -> BrokerHandle:
    """Start the server; health turns SERVING once Triton is ready and every shard has a reachable replica (or
    after `config.ready_wait_s`, once one shard has)."""
    embedder = embedder or _default_embedder(config)
    # Stale-copy removals a down replica missed are kept in Redis too, beyond this broker's life: in their own
    # Redis when one is configured (the cache's evicts under memory pressure), else in the cache's.
    journal_url = config.removal_journal_url
    journal = HintJournal(journal_url, backoff_s=config.redis_backoff_s) if journal_url else None
    pool = ShardPool(
        config.shard_map,
        tls_ca_file=config.shard_tls_ca_file,
        tls_cert_file=config.shard_tls_cert_file,
        tls_key_file=config.shard_tls_key_file,
        calls_in_flight=config.shard_calls_in_flight,
        batch_max_searches=config.shard_batch_max_searches,
        search_streams=config.shard_search_streams,
        removal_journal=journal,
    )
    pool.removal_hints.start()  # with a journal: takes up the removals a stopped broker left there
    cache = repair = None
    hooks: list[Callable] = [embedder.close, *([journal.close] if journal else []), pool.close]
    if config.redis_url:
        cache = DuplicateCache(
            config.redis_url,
            timeout_s=config.redis_timeout_s,
            backoff_s=config.redis_backoff_s,
            phash_radius=config.near_phash_radius,
            dhash_radius=config.near_dhash_radius,
        )
        repair = CacheRepairQueue(cache, interval_s=config.cache_repair_interval_s)
        repair.start()
        hooks += [cache.close, repair.stop]
    broker = Broker(
        pool=pool,
        embedder=embedder,
        cache=cache,
        repair=repair,
        dimension=config.dimension,
        max_top_k=config.max_top_k,
        max_image_bytes=config.max_image_bytes,
        max_image_pixels=config.max_image_pixels,
        max_decoding_pixels=config.max_decoding_pixels,
        near_min_similarity=config.near_min_similarity,
    )
    hooks.append(broker.close)  # before the cache closes (hooks run last first)
    servicer = BrokerService(
        broker,
        search_timeout_s=config.search_timeout_s,
        ingest_timeout_s=config.ingest_timeout_s,
        write_token=config.write_token,
        ingest_chunk_size=config.ingest_chunk_size,
        ingest_concurrency=config.ingest_concurrency,
        max_ingest_bytes_in_flight=config.max_ingest_bytes_in_flight,
        max_ingest_streams=config.max_ingest_streams,
    )

    def register(server):
        broker_pb2_grpc.add_BrokerServiceServicer_to_server(servicer, server)
        return [SERVICE_NAME]

    service = await start_grpc_service(config.server, register, component="broker")
    service.serve_request_streams(servicer.search_streams)
    gate = asyncio.create_task(_serve_and_watch_shards(service, broker, config))

    async def cancel_gate():
        gate.cancel()

    hooks.append(cancel_gate)
    return BrokerHandle(service=service, broker=broker, _stop_hooks=hooks)


async def _serve_and_watch_shards(service: GrpcService, broker: Broker, config: BrokerConfig) -> None:
    """The start-up gate, then the shards' reachability every shard_health_interval_s for as long as the broker
    runs: a broker serving with shards unreachable (after ready_wait_s, or since) shows it in
    imgsearch_broker_shards_unreachable, not only in its log."""
    await _serve_when_ready(service, broker, config.health_check_interval_s, config.ready_wait_s)
    while True:
        await asyncio.sleep(config.shard_health_interval_s)
        try:
            shards = await broker.pool.reachable(timeout_s=config.health_check_interval_s)
        except Exception:  # noqa: BLE001 - a failed check leaves the last value; the next one tries again
            log.exception("shard health check failed")
            continue
        _export_unreachable(shards)


def _export_unreachable(shards: dict[str, bool]) -> list[str]:
    down = sorted(name for name, ok in shards.items() if not ok)
    metrics.SHARDS_UNREACHABLE.set(len(down))
    return down


async def _serve_when_ready(service: GrpcService, broker: Broker, interval_s: float, ready_wait_s: float) -> None:
    """Startup gate only: once SERVING, the broker stays SERVING while Triton or shards fail, because it still
    answers (exact matches without Triton, partial results without a shard); turning every broker NOT_SERVING
    on a Triton blip would make a partial outage total.

    It waits for Triton and a reachable replica of every shard, but for `ready_wait_s` at most: after that one
    reachable shard is enough, as it is for a broker that was already serving. Otherwise a broker (re)started
    during a partial outage (a rollout, an eviction, a scale-up) stayed out of the load balancer while its peers
    answered, and with every broker restarted the partial outage became total."""
    started = time.monotonic()
    while True:
        try:
            triton_ok = await broker.embedder.ready(timeout_s=interval_s)
        except Exception:  # noqa: BLE001 - any failure means not ready yet
            triton_ok = False
        shards = await broker.pool.reachable(timeout_s=interval_s)
        down = _export_unreachable(shards)
        if triton_ok and not down:
            await service.set_serving(True)
            log.info("broker serving on port %d", service.port)
            return
        waited_s = time.monotonic() - started
        if waited_s >= ready_wait_s and len(down) < len(shards):
            await service.set_serving(True)
            log.warning("broker serving on port %d after %.0f s with part of its dependencies down (triton ready=%s, "
                        "shards without a reachable replica: %s): answers are partial until they are back",
                        service.port, waited_s, triton_ok, ", ".join(down) or "none")
            return
        log.info("waiting: triton ready=%s, shards without a reachable replica: %s", triton_ok,
                 ", ".join(down) or "none")
        await asyncio.sleep(interval_s)


async def _amain(config: BrokerConfig) -> None:
    handle = await start_broker(config)
    print(
        f"imgsearch-broker listening on {config.server.host}:{handle.port} (metrics :{handle.metrics_port})",
        flush=True,
    )
    await run_until_signalled(handle.service, on_stop=handle.close)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = BrokerConfig.from_env(argv)
    freeze_startup_objects()  # full collections then walk only what the broker builds (imgsearch.gc_pauses)
    run_event_loop(_amain(config), event_loop=config.server.event_loop)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
