"""`imgsearch-embed bench`: embedding throughput and latency on this machine.

Three ways of turning encoded photos into embeddings, each driven through the same `Embedder` interface by N
concurrent clients that each send one photo per call (as the broker does, one query image per search):

- ``torch``: in-process PyTorch (the same network as the shipped ONNX model; weights do not change the cost),
- ``onnxruntime``: in-process ONNX Runtime (`OnnxEmbedder`),
- ``triton``: a real Triton Inference Server on this CPU (`imgsearch-embed serve`'s repository) over gRPC
  (`TritonEmbedder`).

Every path includes decoding and preprocessing. Results go to a Markdown table and a JSON file. Not part of the
tests: it takes a few minutes and wants a quiet machine.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from embedder.client import (
    DEFAULT_BATCH_WINDOW_S,
    DEFAULT_MAX_BATCH,
    Embedder,
    MicroBatcher,
    OnnxEmbedder,
    TritonEmbedder,
    check_sizes,
)
from embedder.model_files import default_model_path
from embedder.preprocess import DEFAULT_MAX_IMAGE_BYTES, preprocess_bytes

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("IMGSEARCH_DATA_DIR", REPO_ROOT.parent / "shared" / "data"))
BACKENDS = ("torch", "onnxruntime", "triton")


class TorchEmbedder(Embedder):
    """In-process PyTorch, batched and threaded exactly like OnnxEmbedder (for the benchmark only)."""

    def __init__(self, *, checkpoint: Path | None, threads: int, max_batch: int = DEFAULT_MAX_BATCH) -> None:
        import torch

        from embedder.model import build_pretrained_embedder, load_checkpoint

        torch.set_num_threads(threads)
        self._torch = torch
        self._model = (load_checkpoint(checkpoint) if checkpoint else build_pretrained_embedder()).eval()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="torch-embedder")
        self._batcher = MicroBatcher(self._infer, max_batch=max_batch, window_s=DEFAULT_BATCH_WINDOW_S,
                                     max_inflight=1)

    def _run(self, images: list[bytes]) -> np.ndarray:
        pixels = self._torch.from_numpy(np.stack([preprocess_bytes(data) for data in images]))
        with self._torch.inference_mode():
            return self._model(pixels).numpy()

    async def _infer(self, images: list[bytes], timeout_s: float) -> np.ndarray:
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._run, images)

    async def embed(self, images: Sequence[bytes], *, timeout_s: float, bulk: bool = False) -> np.ndarray:
        images = list(images)
        check_sizes(images, max_image_bytes=DEFAULT_MAX_IMAGE_BYTES)
        return await self._batcher.submit(images, timeout_s=timeout_s, bulk=bulk)

    async def ready(self, *, timeout_s: float) -> bool:
        return True

    async def close(self) -> None:
        await self._batcher.close()
        self._executor.shutdown(wait=False, cancel_futures=True)


@dataclass(frozen=True, kw_only=True)
class LoadResult:
    backend: str
    concurrency: int
    requests: int
    seconds: float
    images_per_s: float
    p50_ms: float
    p95_ms: float
    p99_ms: float


async def run_load(embedder: Embedder, backend: str, images: list[bytes], *, concurrency: int,
                   duration_s: float, timeout_s: float = 60.0) -> LoadResult:
    """`concurrency` clients in a closed loop, one image per call, for `duration_s`."""
    latencies: list[float] = []
    started = time.perf_counter()
    stop_at = started + duration_s

    async def client(offset: int) -> None:
        i = offset
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            await embedder.embed([images[i % len(images)]], timeout_s=timeout_s)
            latencies.append(time.perf_counter() - t0)
            i += concurrency

    await asyncio.gather(*(client(k) for k in range(concurrency)))
    elapsed = time.perf_counter() - started
    ms = np.array(latencies) * 1000.0
    return LoadResult(
        backend=backend, concurrency=concurrency, requests=len(latencies), seconds=round(elapsed, 2),
        images_per_s=round(len(latencies) / elapsed, 2), p50_ms=round(float(np.percentile(ms, 50)), 1),
        p95_ms=round(float(np.percentile(ms, 95)), 1), p99_ms=round(float(np.percentile(ms, 99)), 1),
    )


async def bench_backend(embedder: Embedder, backend: str, images: list[bytes], *, concurrencies: Sequence[int],
                        duration_s: float, warmup_requests: int) -> list[LoadResult]:
    for i in range(warmup_requests):
        await embedder.embed([images[i % len(images)]], timeout_s=120)
    results = []
    for concurrency in concurrencies:
        result = await run_load(embedder, backend, images, concurrency=concurrency, duration_s=duration_s)
        print(f"  {backend:12s} c={concurrency:<2d} {result.images_per_s:7.2f} img/s  p50 {result.p50_ms:7.1f} ms"
              f"  p95 {result.p95_ms:7.1f} ms  p99 {result.p99_ms:7.1f} ms", flush=True)
        results.append(result)
    return results


def model_only_throughput(model_path: Path, images: list[bytes], *, threads: int, batch: int,
                          seconds: float, allow_spinning: bool) -> float:
    """ONNX Runtime on already-preprocessed pixels: the ceiling of the model itself on this CPU."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if allow_spinning else "0")
    session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    pixels = np.stack([preprocess_bytes(images[i % len(images)]) for i in range(batch)])
    session.run(["embedding"], {"pixels": pixels})
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        session.run(["embedding"], {"pixels": pixels})
        done += batch
    return done / (time.perf_counter() - started)


def load_images(count: int) -> list[bytes]:
    from embedder.data import grocery_listing

    paths = [rel for rel, _ in grocery_listing(DATA_DIR / "grocery", "val")]
    step = max(1, len(paths) // count)
    return [(DATA_DIR / "grocery" / p).read_bytes() for p in paths[::step][:count]]


def machine_description() -> dict:
    cpu = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    import onnxruntime

    info = {
        "cpu": cpu, "cores": os.cpu_count(), "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(), "onnxruntime": onnxruntime.__version__, "gpu": "none",
        "platform": platform.platform(),
    }
    try:
        import torch

        info["torch"] = torch.__version__
    except ImportError:
        pass
    return info


def write_markdown(path: Path, *, command: str, machine: dict, results: list[LoadResult], model_only: float,
                   settings: dict) -> None:
    by = {(r.backend, r.concurrency): r for r in results}
    concurrencies = sorted({r.concurrency for r in results})
    lines = [
        "# Embedding benchmark",
        "",
        f"Generated by `{command}` on {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC.",
        "",
        ("Each of N concurrent clients sends one encoded grocery photo (about 348x464 JPEG) per call, in a closed "
        "loop; every path includes decoding, EXIF/mode normalisation, resize/crop and normalisation "
        "(embedder.preprocess), then the embedding network (EfficientNet-Lite0 + GeM + 512-d projection). "
        "Concurrent calls are micro-batched (2 ms window, up to 32 images) by the same client code for all three "
        "paths; Triton additionally runs its dynamic batcher."),
        "",
        "## Machine",
        "",
        (f"- CPU: {machine['cpu']}, {machine['cores']} cores (shared with other work; load average at start "
        f"{machine['load_average_at_start']})"),
        ("- GPU: none in this session, so the GPU configuration (KIND_GPU instance group, TensorRT FP16) was "
        "generated and checked by tests but not measured."),
        (f"- Python {machine['python']}, ONNX Runtime {machine['onnxruntime']}, PyTorch {machine.get('torch', '-')}, "
        "Triton Inference Server 2.51.0 (the tritonserver of nvidia-pytriton 0.7.0)"),
        f"- Settings: {', '.join(f'{k}={v}' for k, v in settings.items())}",
        "",
        "## Throughput (images/s) and latency",
        "",
        "| backend | clients | images/s | p50 ms | p95 ms | p99 ms | requests |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        lines.append(f"| {r.backend} | {r.concurrency} | {r.images_per_s:.1f} | {r.p50_ms:.1f} | {r.p95_ms:.1f} "
                     f"| {r.p99_ms:.1f} | {r.requests} |")
    lines += ["", f"Model only (ONNX Runtime, pre-decoded pixels, batch 8): {model_only:.1f} images/s.", ""]
    if any(("triton", c) in by and ("onnxruntime", c) in by for c in concurrencies):
        lines += ["## Triton / in-process ONNX Runtime", "", "| clients | ratio |", "| ---: | ---: |"]
        for c in concurrencies:
            if ("triton", c) in by and ("onnxruntime", c) in by:
                ratio = by[("triton", c)].images_per_s / by[("onnxruntime", c)].images_per_s
                lines.append(f"| {c} | {ratio:.2f} |")
        best_triton = max(r.images_per_s for r in results if r.backend == "triton")
        best_ort = max(r.images_per_s for r in results if r.backend == "onnxruntime")
        lines += ["", (f"Best throughput: Triton {best_triton:.1f} images/s vs in-process ONNX Runtime "
                      f"{best_ort:.1f} images/s, ratio {best_triton / best_ort:.2f} (target >= 0.8)."), ""]
    lines += [
        "## Notes",
        "",
        ("- The tritonserver shipped in nvidia-pytriton has only the python backend, so on this CPU the "
        "`imgsearch_embedding` model runs the same ONNX file through ONNX Runtime inside a python-backend model "
        "(`embedding_backend=\"python\"` in embedder.triton_repo); a GPU Triton (NGC image) uses the "
        "onnxruntime backend with the generated `--gpu [--tensorrt-fp16]` configuration instead. The ensemble, "
        "the tensors and the client are the same."),
        ("- Triton pipelines decoding (preprocessing model, its own process) with inference, which the in-process "
        "paths do serially in one worker thread."),
        "- The machine has 2 cores shared with other engineers' work, so figures vary by +-20% between runs.",
        "",
    ]
    path.write_text("\n".join(lines))


async def run(args: argparse.Namespace) -> int:
    model_path = args.model or default_model_path()
    images = load_images(args.images)
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    backends = [b.strip() for b in args.backends.split(",")]
    settings = {"triton": args.triton_url or "started here (nvidia-pytriton tritonserver, CPU)",
                "threads": args.threads, "onnxruntime_allow_spinning": args.allow_spinning, "duration_s_per_point": args.duration_s, "images": len(images),
                "model": str(model_path.relative_to(REPO_ROOT) if model_path.is_relative_to(REPO_ROOT) else model_path)}
    machine = machine_description()
    print(f"machine: {machine}", flush=True)
    results: list[LoadResult] = []
    for backend in backends:
        if backend == "torch":
            embedder: Embedder = TorchEmbedder(checkpoint=args.checkpoint, threads=args.threads)
            results += await bench_backend(embedder, backend, images, concurrencies=concurrencies,
                                           duration_s=args.duration_s, warmup_requests=4)
            await embedder.close()
        elif backend == "onnxruntime":
            embedder = OnnxEmbedder(model_path, intra_op_threads=args.threads, allow_spinning=args.allow_spinning)
            results += await bench_backend(embedder, backend, images, concurrencies=concurrencies,
                                           duration_s=args.duration_s, warmup_requests=4)
            await embedder.close()
        elif backend == "triton" and args.triton_url:  # an existing server, e.g. a GPU Triton
            embedder = TritonEmbedder(args.triton_url)
            results += await bench_backend(embedder, backend, images, concurrencies=concurrencies,
                                           duration_s=args.duration_s, warmup_requests=8)
            await embedder.close()
        elif backend == "triton":
            from embedder.triton_repo import RepositoryOptions, write_model_repository
            from embedder.triton_server import start_triton

            with tempfile.TemporaryDirectory(prefix="imgsearch-bench-repo-") as repo:
                write_model_repository(repo, model_path=model_path, embedding_backend="python",
                                       options=RepositoryOptions(intra_op_threads=args.threads,
                                                                 allow_spinning=args.allow_spinning))
                with start_triton(repo) as server:
                    embedder = TritonEmbedder(server.grpc_url)
                    results += await bench_backend(embedder, backend, images, concurrencies=concurrencies,
                                                   duration_s=args.duration_s, warmup_requests=4)
                    await embedder.close()
        else:
            raise SystemExit(f"unknown backend {backend!r} (choose from {', '.join(BACKENDS)})")
    model_only = model_only_throughput(model_path, images, threads=args.threads, batch=8, seconds=args.duration_s,
                                       allow_spinning=args.allow_spinning)
    print(f"  model only (ONNX Runtime, batch 8, pre-decoded): {model_only:.1f} img/s", flush=True)
    command = "imgsearch-embed bench " + " ".join(shlex.quote(a) for a in args.argv)
    args.out_json.parent.mkdir(parents=True, exist_ok=True)
    args.out_json.write_text(json.dumps({
        "command": command.strip(), "machine": machine, "settings": settings,
        "results": [asdict(r) for r in results], "model_only_images_per_s": round(model_only, 2),
    }, indent=2) + "\n")
    write_markdown(args.out_md, command=command.strip(), machine=machine, results=results, model_only=model_only,
                   settings=settings)
    print(f"wrote {args.out_md} and {args.out_json}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="imgsearch-embed bench", description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default=",".join(BACKENDS),
                        help=f"comma-separated, of {', '.join(BACKENDS)}")
    parser.add_argument("--concurrency", default="1,2,4,8", help="client concurrencies, comma-separated")
    parser.add_argument("--duration-s", type=float, default=10.0, help="seconds per (backend, concurrency)")
    parser.add_argument("--images", type=int, default=32, help="distinct grocery val photos to cycle through")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads for every backend")
    parser.add_argument("--allow-spinning", action="store_true",
                        help="let ONNX Runtime's intra-op threads spin-wait (default off, as served)")
    parser.add_argument("--model", type=Path, default=None, help="ONNX file (default: the shipped model)")
    parser.add_argument("--triton-url", default=None,
                        help="benchmark this running Triton (host:port, gRPC) instead of starting one here")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="PyTorch checkpoint for the torch backend (default: the untrained network)")
    parser.add_argument("--out-md", type=Path, default=REPO_ROOT / "docs" / "bench-embedder.md",
                        help="markdown report (default: the repository's docs/bench-embedder.md, replaced)")
    parser.add_argument("--out-json", type=Path, default=REPO_ROOT / "docs" / "bench-embedder.json",
                        help="JSON report (default: the repository's docs/bench-embedder.json, replaced)")
    args = parser.parse_args(argv)
    try:
        concurrencies = [int(c) for c in args.concurrency.split(",")]
    except ValueError:
        parser.error(f"--concurrency {args.concurrency!r}: comma-separated whole numbers")
    # zeros measured nothing and ended in a traceback of an empty percentile or a division by zero (review)
    if min(concurrencies) < 1 or args.images < 1 or args.threads < 1 or not args.duration_s > 0:
        parser.error("--concurrency, --images and --threads must be at least 1, --duration-s above 0")
    args.argv = argv
    return asyncio.run(run(args))


if __name__ == "__main__":
    raise SystemExit(main())
