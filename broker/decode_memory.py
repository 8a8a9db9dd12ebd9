"""Peak memory of a real `imgsearch-broker` while searches with large images arrive at once.

    python -m broker.decode_memory [--searches 4] [--side 6300] [--max-decoding-pixels N]

Starts the broker as its own process (no shard, Triton or Redis behind it: what is measured is the decoding,
which comes first; the searches then fail UNAVAILABLE or DEADLINE_EXCEEDED), sends `--searches` concurrent
searches, each with a side x side RGBA PNG (a flat colour: 170 KB of PNG for 40 Mpx), and prints the broker's peak
resident memory (VmHWM) before and after. See broker/decode_budget.py for why it matters.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import re
import subprocess
import sys
import time
from pathlib import Path

from PIL import Image

from broker.client import BrokerClient
from imgsearch.ports import free_port


def _peak_mb(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+)", status).group(1)) // 1024


def _png(side: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGBA", (side, side), (10, 200, 30, 128)).save(buffer, format="PNG")
    return buffer.getvalue()


async def _search_all(address: str, image: bytes, searches: int) -> list[str]:
    async with BrokerClient(address) as client:

        async def one() -> str:
            try:
                await client.search(image=image, top_k=3, timeout_s=30)
            except Exception as exc:  # noqa: BLE001 - the outcome is reported, not raised
                return type(exc).__name__
            return "answered"

        return list(await asyncio.gather(*(one() for _ in range(searches))))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--searches", type=int, default=4)
    parser.add_argument("--side", type=int, default=6300, help="the PNG's width and height in pixels")
    parser.add_argument("--max-decoding-pixels", type=int, default=None, help="passed to the broker")
    args = parser.parse_args(argv)
    image = _png(args.side)
    port = free_port()
    command = [sys.executable, "-m", "broker.server", "--port", str(port), "--metrics-port", "-1",
               "--shard-map", '{"shards": {"s0": ["127.0.0.1:1"]}, "categories": {}}',
               "--triton-url", "127.0.0.1:1", "--max-image-pixels", str(max(args.side * args.side, 1))]
    if args.max_decoding_pixels:
        command += ["--max-decoding-pixels", str(args.max_decoding_pixels)]
    broker = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(5)  # started (it stays NOT_SERVING without its dependencies, but answers searches)
        idle = _peak_mb(broker.pid)
        outcomes = asyncio.run(_search_all(f"127.0.0.1:{port}", image, args.searches))
        peak = _peak_mb(broker.pid)
    finally:
        broker.terminate()
        broker.wait(timeout=30)
    print(f"{args.searches} concurrent searches with a {args.side}x{args.side} RGBA PNG of {len(image):,} bytes: "
          f"outcomes {outcomes}; broker peak RSS {idle} MB idle, {peak} MB after")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
