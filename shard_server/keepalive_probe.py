"""`python -m shard_server.keepalive_probe --idle-s 330`: does an idle search stream outlive the clients' pings?

ShardClient keeps its SearchStreams open between searches, and a channel pings every 30 s while a call is open
(`imgsearch.serving.client_channel_options`). grpc's servers by default allow a ping without data only every
5 minutes and answer a third early one with GOAWAY "too_many_pings", which ends every call of the connection:
an idle stream died after a few minutes and the next search went over a new one. Our servers allow one every
10 s (`grpc.http2.min_ping_interval_without_data_ms` in `start_grpc_service`).

This starts two real shard servers in process, ours and a control built with grpc's default for that option,
makes one search through a ShardClient to each, leaves both clients idle for `--idle-s` seconds, and prints
whether each stream is still open (and the status it ended with if not). Takes `--idle-s` plus a few seconds;
the control's stream is expected to end with UNAVAILABLE "Too many pings" within 5 idle minutes (after
about 4.6 in the run of 2026-12-05 21:32Z). Both servers run without their idle-stream limit
(`imgsearch.serving.STREAM_IDLE_LIMIT_S`, 5 minutes, which would end both streams with status OK before the
control's pings did): this measures the pings alone.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np

from shard_server import synthetic
from shard_server.client import ShardClient
from shard_server.config import ShardConfig
from shard_server.server import start_shard_server
from shard_server.types import SearchQuery

DIM = 32
PING_OPTION = "grpc.http2.min_ping_interval_without_data_ms"


def _server_with_grpc_default(real_server):
    def build(*args, options=(), **kwargs):
        return real_server(*args, options=[o for o in options if o[0] != PING_OPTION], **kwargs)
    return build


async def _start(data_dir: Path, *, control: bool):
    real_server = grpc.aio.server
    if control:
        grpc.aio.server = _server_with_grpc_default(real_server)
    try:
        handle = await start_shard_server(ShardConfig(data_dir=data_dir, dimension=DIM))
    finally:
        grpc.aio.server = real_server
    client = ShardClient(f"127.0.0.1:{handle.port}")
    catalogue = synthetic.SyntheticCatalogue(dim=DIM, clusters=4)
    await client.upsert(list(catalogue.records(0, 100, category="a")), timeout_s=10)
    return handle, client


async def probe(idle_s: float) -> dict[str, dict]:
    from imgsearch import serving

    query = SearchQuery(vector=np.ones(DIM, np.float32), top_k=3)
    report: dict[str, dict] = {}
    serving.STREAM_IDLE_LIMIT_S = float("inf")  # the pings alone (see the module doc); this process only probes
    with tempfile.TemporaryDirectory() as tmp:
        setups = {name: await _start(Path(tmp) / name, control=name == "grpc-default")
                  for name in ("ours", "grpc-default")}
        streams = {}
        for name, (_, client) in setups.items():
            await client.search(query, timeout_s=5)
            streams[name] = client._search_streams._idle[0].call  # the stream that search used, now idle
        started = time.monotonic()
        await asyncio.sleep(idle_s)
        for name, (handle, client) in setups.items():
            call = streams[name]
            ended = call.done()
            outcome = {"idle_s": round(time.monotonic() - started), "stream_ended": ended}
            if ended:
                outcome.update(code=(await call.code()).name, details=await call.details())
            outcome["next_search_hits"] = len((await client.search(query, timeout_s=5)).hits)
            report[name] = outcome
            await client.close()
            await handle.stop(snapshot=False)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shard_server.keepalive_probe", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--idle-s", type=float, default=330.0, help="how long the streams sit idle (default 330)")
    args = parser.parse_args(argv)
    for name, outcome in asyncio.run(probe(args.idle_s)).items():
        print(f"{name}: {outcome}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
