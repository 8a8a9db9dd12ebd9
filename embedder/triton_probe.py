"""Liveness probe for the Triton pod: one real inference through the `imgsearch` ensemble.

Why not /v2/health/live or /v2/health/ready: when a python-backend stub process dies (OOM-killed, `kill -9` of
the `triton_python_backend_stub` of imgsearch_preprocess), Triton does not restart it: every inference fails
with INTERNAL "Stub process 'imgsearch_preprocess_0_0' is not healthy" forever, while both health endpoints keep
answering 200. So Kubernetes' liveness probe runs this instead (deploy/base/triton/deployment.yaml), and a pod
whose models cannot answer is restarted.

    python3 -m embedder.triton_probe [--url 127.0.0.1:8000] [--model imgsearch] [--timeout-s 5]

It POSTs an 8x8 PNG to /v2/models/<model>/infer over HTTP (KServe v2 with Triton's binary tensor data extension)
and checks that `embedding` comes back as 512 finite numbers. Exit 0 on a good answer; otherwise exit 1 with one
line on stderr saying what failed. It runs in the Triton container (Python 3.10, no tritonclient), so it uses the
standard library only and imports nothing heavy.
"""

from __future__ import annotations

import argparse
import json
import math
import struct
import sys
import urllib.error
import urllib.request
import zlib

IMAGE_INPUT = "image"  # embedder.triton_repo.IMAGE_INPUT (not imported: it pulls protobuf and tritonclient)
EMBEDDING_OUTPUT = "embedding"
EMBEDDING_DIM = 512


def tiny_png(size: int = 8) -> bytes:
    """A size x size RGB gradient PNG, built with zlib and struct."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\x00" + bytes(v for x in range(size) for v in (x * 32 % 256, y * 32 % 256, 128))
                    for y in range(size))
    header = struct.pack(">IIBBBBB", size, size, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def infer_request(image: bytes) -> tuple[bytes, int]:
    """Body of a one-image infer request (binary input, JSON output) and the length of its JSON part."""
    tensor = struct.pack("<I", len(image)) + image  # BYTES element: 4-byte little-endian length, then the bytes
    header = json.dumps({
        "inputs": [{"name": IMAGE_INPUT, "datatype": "BYTES", "shape": [1, 1],
                    "parameters": {"binary_data_size": len(tensor)}}],
        "outputs": [{"name": EMBEDDING_OUTPUT, "parameters": {"binary_data": False}}],
    }).encode()
    return header + tensor, len(header)


def _triton_error(body: bytes) -> str:
    try:
        return str(json.loads(body)["error"])
    except (ValueError, KeyError, TypeError):
        return body[:300].decode(errors="replace")


def probe(url: str, model: str, timeout_s: float) -> str | None:
    """None when the model answers one inference with a good embedding, else what failed."""
    endpoint = f"http://{url}/v2/models/{model}/infer"
    body, header_length = infer_request(tiny_png())
    request = urllib.request.Request(endpoint, data=body, method="POST", headers={
        "Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(header_length)})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            answer = response.read()
            json_length = response.headers.get("Inference-Header-Content-Length")
    except urllib.error.HTTPError as exc:
        return f"HTTP {exc.code} from {endpoint}: {_triton_error(exc.read())}"
    except urllib.error.URLError as exc:
        reason = exc.reason
        if isinstance(reason, TimeoutError):
            return f"no answer from {endpoint} within {timeout_s:g}s"
        if isinstance(reason, ConnectionRefusedError):
            return f"connection refused by {url}"
        return f"cannot reach {endpoint}: {reason}"
    except TimeoutError:  # socket.timeout is TimeoutError since 3.10
        return f"no answer from {endpoint} within {timeout_s:g}s"
    except OSError as exc:
        return f"cannot reach {endpoint}: {exc}"
    try:
        if json_length is not None:
            answer = answer[:int(json_length)]
        outputs = {o["name"]: o for o in json.loads(answer)["outputs"]}
        data = outputs[EMBEDDING_OUTPUT]["data"]
        values = [float(v) for v in data]
    except (ValueError, KeyError, TypeError) as exc:
        return f"unexpected answer from {endpoint}: {type(exc).__name__}: {exc}"
    if len(values) != EMBEDDING_DIM or not all(math.isfinite(v) for v in values):
        finite = sum(math.isfinite(v) for v in values)
        return f"bad {EMBEDDING_OUTPUT} from {endpoint}: {len(values)} values ({finite} finite), want {EMBEDDING_DIM}"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m embedder.triton_probe", description=__doc__.split("\n")[0])
    parser.add_argument("--url", default="127.0.0.1:8000", help="Triton's HTTP address, HOST:PORT")
    parser.add_argument("--model", default="imgsearch", help="the model to run (the ensemble)")
    parser.add_argument("--timeout-s", type=float, default=5.0, help="seconds to wait for the answer")
    args = parser.parse_args(argv)
    problem = probe(args.url, args.model, args.timeout_s)
    if problem is None:
        return 0
    print(f"triton probe failed: {' '.join(problem.split())}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
