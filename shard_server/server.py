"""The shard server process: ``imgsearch-shard --data-dir DIR --port N --metrics-port M ...``.

Start-up: the gRPC port opens at once with health NOT_SERVING (RPCs answer UNAVAILABLE), the newest snapshot is
loaded (checksums verified) and the write-ahead log replayed, then health turns SERVING. SIGTERM drains in-flight
RPCs, writes a final snapshot and exits. A failed write-ahead log (an fsync error) stops the process the same way,
without the snapshot, with exit status 1: a restart replays the log.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import faiss

from imgsearch.gc_pauses import freeze_startup_objects
from imgsearch.serving import (
    GrpcService,
    run_event_loop,
    run_until_signalled,
    start_grpc_service,
)
from imgsearch.v1 import shard_pb2_grpc
from shard_server.config import ShardConfig
from shard_server.convert import SERVICE_NAME
from shard_server.engine import ShardEngine
from shard_server.errors import LoadInterruptedError
from shard_server.service import ShardServicer

log = logging.getLogger("shard_server")


def _single_threaded_faiss() -> None:
    # One OpenMP thread per search: concurrent single-query searches scale across the pool's threads
    # instead of fighting over one OpenMP team (and the setting is per thread, so training keeps its own).
    faiss.omp_set_num_threads(1)


@dataclass
class ShardServerHandle:
    service: GrpcService
    engine: ShardEngine
    search_pool: ThreadPoolExecutor
    write_pool: ThreadPoolExecutor
    load_task: asyncio.Task

    @property
    def port(self) -> int:
        return self.service.port

    @property
    def metrics_port(self) -> int | None:
        return self.service.metrics_port

    async def wait_loaded(self) -> None:
        await self.load_task

    async def stop(self, *, snapshot: bool = True) -> None:
        await self.service.stop()
        await self.release(snapshot=snapshot)

    async def release(self, *, snapshot: bool) -> None:
        """After the server stopped: end a load still running (at its next log record), then close the engine
        (a final snapshot if asked and loaded) and the pools."""
        self.engine.interrupt_load()
        # Cancelling the task would not stop the loading thread, and closing the engine under it let the load
        # open a fresh log segment after the close; so wait for it.
        await asyncio.gather(asyncio.shield(self.load_task), return_exceptions=True)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, lambda: self.engine.close(snapshot=snapshot and self.engine.loaded))
        self.search_pool.shutdown(wait=True)
        self.write_pool.shutdown(wait=True)


async def start_shard_server(config: ShardConfig, *, wait_loaded: bool = True) -> ShardServerHandle:
    """Start serving; with ``wait_loaded`` return only once the snapshot and log are loaded (health SERVING)."""
    engine = ShardEngine(config)
    if config.inline_search:
        _single_threaded_faiss()  # this thread runs the event loop, and with inline_search the searches
    search_pool = ThreadPoolExecutor(config.search_threads, thread_name_prefix="shard-search",
                                     initializer=_single_threaded_faiss)
    write_pool = ThreadPoolExecutor(config.write_threads, thread_name_prefix="shard-write",
                                    initializer=_single_threaded_faiss)
    servicer = ShardServicer(engine, search_pool, write_pool)

    def register(server):
        shard_pb2_grpc.add_ShardServiceServicer_to_server(servicer, server)
        return [SERVICE_NAME]

    service = await start_grpc_service(config.server_options(), register, component="shard")
    service.serve_request_streams(servicer.search_streams)
    loop = asyncio.get_running_loop()
    # Fail-stop: a failed log refuses every write until a restart, so the process stops (exit status 1) and its
    # supervisor (the kubelet, systemd) restarts it; the restart replays the log.
    engine.wal.on_failure = lambda why: loop.call_soon_threadsafe(service.request_stop, why)

    async def load() -> None:
        await asyncio.get_running_loop().run_in_executor(None, engine.load)
        engine.start_background()
        await service.set_serving(True)

    load_task = asyncio.create_task(load())
    handle = ShardServerHandle(service=service, engine=engine, search_pool=search_pool, write_pool=write_pool,
                               load_task=load_task)
    if wait_loaded:
        try:
            await load_task
        except BaseException:
            await service.stop(0)
            search_pool.shutdown(wait=False)
            write_pool.shutdown(wait=False)
            raise
    return handle


def _lock_data_dir(config: ShardConfig) -> int:
    """One shard process per data dir: a second one replays the same log, and its final snapshot drops the log
    segment the first is still appending to (writes the first acknowledged are then lost on its next crash).
    The lock is held until the process exits."""
    try:
        config.data_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(config.data_dir / "LOCK", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:  # a regular file in its place, a read-only filesystem, no permission (a traceback before)
        raise SystemExit(f"imgsearch-shard: cannot use data dir {config.data_dir}: {e.strerror or e}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise SystemExit(f"imgsearch-shard: data dir {config.data_dir} is in use by another process") from None
    return fd


async def _serve(config: ShardConfig) -> int:
    _lock_data_dir(config)
    handle = await start_shard_server(config, wait_loaded=False)
    log.info("shard listening on %s:%d (metrics %s), data dir %s", config.host, handle.port,
             handle.metrics_port, config.data_dir)

    async def watch_load() -> None:
        try:
            await handle.load_task
        except LoadInterruptedError as exc:
            log.info("%s", exc)
        except Exception:
            log.exception("shard failed to load its data; exiting")
            await handle.service.server.stop(0)

    watcher = asyncio.create_task(watch_load())
    await run_until_signalled(handle.service, on_stop=lambda: _drain(handle))
    await asyncio.gather(watcher, return_exceptions=True)
    failure = handle.load_task.exception() if handle.load_task.done() and not handle.load_task.cancelled() else None
    if failure is not None and not isinstance(failure, LoadInterruptedError):
        return 1
    if handle.engine.wal.failed:
        log.error("exiting with status 1: %s", handle.engine.wal.failed)
        return 1
    return 0


async def _drain(handle: ShardServerHandle) -> None:
    # No final snapshot after a failed log: it could not rotate the log, and the restart replays it.
    await handle.release(snapshot=not handle.engine.wal.failed)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = ShardConfig.from_env(sys.argv[1:] if argv is None else argv)
    freeze_startup_objects()  # full collections then walk only what the shard builds (imgsearch.gc_pauses)
    sys.exit(run_event_loop(_serve(config), event_loop=config.event_loop))


if __name__ == "__main__":
    main()
