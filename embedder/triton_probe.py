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

Two refinements (review of 2026-12-06):
- A model of several python-backend instances (`--preprocess-instances`) with one stub dead failed only the
  requests that reached it: the probe alternated between passing and failing and the pod was never restarted.
  So the probe also counts, in /proc, the stub processes of the server listening on its port, against the
  instance count of each python-backend model's config: one missing fails the probe.
- The probe's image queues behind real traffic: on a busy CPU pod it took 6-9 s, and a healthy pod was restarted
  after three probes. A probe that gets no answer in time passes when /v2/health/live still answers (busy, not
  dead: a dead stub answers at once); it fails when the server does not answer that either.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import struct
import sys
import urllib.error
import urllib.request
import zlib

IMAGE_INPUT = "image"  # embedder.triton_repo.IMAGE_INPUT (not imported: it pulls protobuf and tritonclient)
EMBEDDING_OUTPUT = "embedding"
EMBEDDING_DIM = 512
# The models of the ensemble, whose python-backend instances are counted (embedder.triton_repo's names)
STEP_MODELS = ("imgsearch_preprocess", "imgsearch_embedding")
DEFAULT_HTTP_PORT = 8000  # tritonserver's, when its command line names none


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


def _get_json(url: str, path: str, timeout_s: float) -> dict | None:
    try:
        with urllib.request.urlopen(f"http://{url}{path}", timeout=timeout_s) as response:
            return json.loads(response.read())
    except (OSError, ValueError):  # urllib's errors are OSErrors
        return None


def _live(url: str, timeout_s: float) -> bool:
    try:
        with urllib.request.urlopen(f"http://{url}/v2/health/live", timeout=timeout_s) as response:
            return response.status == 200
    except OSError:
        return False


def _processes() -> list[tuple[int, int, list[str]]]:
    """(pid, parent pid, arguments) of every process this one can see."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as stat:
                ppid = int(stat.read().rsplit(b")", 1)[1].split()[1])
            with open(f"/proc/{entry.name}/cmdline", "rb") as cmdline:
                args = cmdline.read().decode(errors="replace").split("\0")
        except (OSError, ValueError, IndexError):  # gone meanwhile, or not ours to read
            continue
        found.append((int(entry.name), ppid, args))
    return found


def missing_stubs(url: str, timeout_s: float) -> str | None:
    """What is missing when the tritonserver serving `url`'s port, found in /proc, has fewer stub processes for a
    python-backend model than its config has instances; None when none is (or the server is not to be seen here:
    another host or container)."""
    port = int(url.rsplit(":", 1)[1]) if ":" in url else DEFAULT_HTTP_PORT
    processes = _processes()

    def serves_port(args: list[str]) -> bool:
        ports = [a.split("=", 1)[1] for a in args if a.startswith("--http-port=")]
        return (ports[-1] == str(port)) if ports else port == DEFAULT_HTTP_PORT

    servers = {pid for pid, _, args in processes if args[0].endswith("tritonserver") and serves_port(args)}
    if len(servers) != 1:
        return None
    stubs = [args for _, ppid, args in processes
             if ppid in servers and args[0].endswith("triton_python_backend_stub")]
    for model in STEP_MODELS:
        config = _get_json(url, f"/v2/models/{model}/config", timeout_s)
        if not config or config.get("backend") != "python":
            continue
        wanted = sum(int(group.get("count", 1)) for group in config.get("instance_group") or [{}])
        running = sum(1 for args in stubs if any(a.startswith(f"{model}_") for a in args[1:]))
        if running < wanted:
            return f"{wanted - running} of the {wanted} processes of model {model} are gone (a model process died)"
    return None


def probe(url: str, model: str, timeout_s: float) -> str | None:
    """None when the model answers one inference with a good embedding (or is busy: see the module doc) and
    none of its processes is gone, else what failed."""
    problem = _infer(url, model, timeout_s)
    if problem == _BUSY:
        return None if _live(url, min(timeout_s, 2.0)) else f"no answer from {url}, not even to /v2/health/live"
    return problem or missing_stubs(url, min(timeout_s, 2.0))


_BUSY = "busy"  # the inference got no answer in time


def _infer(url: str, model: str, timeout_s: float) -> str | None:
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
            return _BUSY
        if isinstance(reason, ConnectionRefusedError):
            return f"connection refused by {url}"
        return f"cannot reach {endpoint}: {reason}"
    except TimeoutError:  # socket.timeout is TimeoutError since 3.10
        return _BUSY
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
