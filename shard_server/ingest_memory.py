"""`python -m shard_server.ingest_memory --vectors N`: the shard's peak memory for one bulk write, and for replaying it.

Starts a real shard process, sends N synthetic 512-d records as one UpsertStream, reads the process's peak
resident memory (VmHWM) once the stream is acknowledged, then kills the shard with SIGKILL before any snapshot,
restarts it (it replays the write from its log) and reads the peak again. Training is switched off
(``IMGSEARCH_SHARD_MIN_TRAIN_ROWS`` above N) so that the figures are the write's and the replay's own, not the
background training's. The wire size of the stream is printed alongside: a shard's memory limit has to cover
its largest stream (``max_stream_bytes``) times the printed ratio, or it is killed while ingesting or, worse,
on every restart while replaying.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

from imgsearch.v1 import shard_pb2
from shard_server import convert, synthetic
from shard_server.client import ShardClient
from shard_server.config import MAX_LOG_FRAME_BYTES
from shard_server.process import ShardProcess


def memory_mib(pid: int) -> dict[str, int]:
    """Peak (VmHWM) and current (VmRSS) resident memory of a process, in MiB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS"):
            out[key] = int(value.split()[0]) // 1024
    return out


async def measure(n: int, batch_size: int) -> None:
    catalogue = synthetic.SyntheticCatalogue(dim=512, clusters=max(1, n // 100), seed=0)
    wire_bytes = sum(
        len(shard_pb2.UpsertStreamRequest(records=[convert.record_to_proto(r) for r in
                                                   catalogue.records(lo, min(n, lo + batch_size))]).SerializeToString())
        for lo in range(0, n, batch_size))
    print(f"{n} records, {wire_bytes / 2**20:.0f} MiB on the wire, messages of {batch_size} records", flush=True)
    env = {"IMGSEARCH_SHARD_MIN_TRAIN_ROWS": str(10 * n + 1), "IMGSEARCH_SHARD_SNAPSHOT_INTERVAL_S": "1e9",
           "IMGSEARCH_SHARD_SNAPSHOT_WAL_BYTES": str(1 << 62),
           "IMGSEARCH_SHARD_MAX_STREAM_BYTES": str(MAX_LOG_FRAME_BYTES)}
    with tempfile.TemporaryDirectory() as tmp:
        shard = ShardProcess(Path(tmp) / "data", env=env).start()
        try:
            idle = memory_mib(shard.proc.pid)["VmRSS"]
            async with ShardClient(shard.address) as client:
                started = time.perf_counter()
                records = (r for lo in range(0, n, batch_size) for r in catalogue.records(lo, min(n, lo + batch_size)))
                written = await client.upsert_stream(records, batch_size=batch_size, timeout_s=3600)
                took = time.perf_counter() - started
            mem = memory_mib(shard.proc.pid)
            print(f"stream: {written} written in {took:.1f} s; idle {idle} MiB, peak {mem['VmHWM']} MiB "
                  f"({(mem['VmHWM'] - idle) * 2**20 / wire_bytes:.1f}x the wire size above idle), "
                  f"after {mem['VmRSS']} MiB", flush=True)
            shard.kill()
            started = time.perf_counter()
            shard.start(timeout_s=3600)
            took = time.perf_counter() - started
            mem = memory_mib(shard.proc.pid)
            print(f"replay after SIGKILL: serving again in {took:.1f} s; peak {mem['VmHWM']} MiB "
                  f"({(mem['VmHWM'] - idle) * 2**20 / wire_bytes:.1f}x), after {mem['VmRSS']} MiB", flush=True)
        finally:
            shard.kill()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shard_server.ingest_memory", description=__doc__.split("\n")[0])
    parser.add_argument("--vectors", type=int, default=200_000)
    parser.add_argument("--batch-size", type=int, default=1000, help="records per stream message")
    args = parser.parse_args(argv)
    asyncio.run(measure(args.vectors, args.batch_size))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
