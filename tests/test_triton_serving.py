"""A real Triton Inference Server (the tritonserver of nvidia-pytriton) serving the shipped model.

One server per module (instance counts of 1: the machine has 2 cores), plus short-lived ones for the fault
test and the `imgsearch-embed serve` command.
"""

from __future__ import annotations

import asyncio
import io
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from PIL import Image

from embedder.client import OnnxEmbedder, TritonEmbedder
from embedder.errors import (
    EmbedderTimeoutError,
    EmbedderUnavailableError,
    ImageTooLargeError,
    InvalidImageError,
)
from embedder.model_files import default_model_path
from embedder.triton_repo import RepositoryOptions, write_model_repository
from embedder.triton_server import TritonStartError, start_triton, triton_environment
from imgsearch.ports import free_port

DATA_DIR = Path(os.environ.get("IMGSEARCH_DATA_DIR", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
ODD = DATA_DIR / "odd-images"
REPO_ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 30.0

pytestmark = pytest.mark.slow

IMAGE_FILES = [
    DATA_DIR / "grocery" / "val" / "Fruit" / "Apple" / "Golden-Delicious" / "Golden-Delicious_001.jpg",
    ODD / "pdq" / "misc-images" / "modes" / "CMYK.jpg",
    ODD / "pdq" / "misc-images" / "modes" / "P.png",
    ODD / "pdq" / "reg-test-input" / "exif-rotn" / "exif-rotn-6.jpg",
    ODD / "imagededup" / "alpha_channel_image.png",
    ODD / "imagededup" / "formats_images" / "giphy.gif",
    ODD / "pdq" / "misc-images" / "wee.jpg",
    REPO_ROOT / "tests" / "fixtures" / "bravo-apple-juice.heic",  # HEIC: pi-heif inside the python backend too
]


@pytest.fixture(scope="module")
def images() -> list[bytes]:
    return [p.read_bytes() for p in IMAGE_FILES]


def _repository(path: Path) -> Path:
    model = default_model_path()
    assert model.is_file(), f"the shipped model is missing: {model}"
    # Two decoding processes: a GPU server runs several (one per core), so the real server is run with more than one.
    options = RepositoryOptions(max_batch_size=8, preferred_batch_sizes=(4, 8), intra_op_threads=2,
                                preprocess_instances=2)
    return write_model_repository(path, model_path=model, embedding_backend="python", options=options)


@pytest.fixture(scope="module")
def triton(tmp_path_factory):
    server = start_triton(_repository(tmp_path_factory.mktemp("triton-repo")))
    try:
        yield server
    finally:
        server.stop()


async def test_triton_and_onnxruntime_give_the_same_vectors(triton, images):
    triton_embedder = TritonEmbedder(triton.grpc_url, max_batch=8)
    onnx_embedder = OnnxEmbedder(default_model_path())
    try:
        assert await triton_embedder.ready(timeout_s=5)
        served = await triton_embedder.embed(images, timeout_s=TIMEOUT_S)
        local = await onnx_embedder.embed(images, timeout_s=TIMEOUT_S)
    finally:
        await triton_embedder.close()
        await onnx_embedder.close()
    assert served.shape == local.shape == (len(images), 512)
    assert served.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(served, axis=1), 1.0, atol=1e-4)
    cosine = (served * local).sum(axis=1) / (np.linalg.norm(served, axis=1) * np.linalg.norm(local, axis=1))
    assert cosine.min() >= 0.9999, cosine
    # Different photos give different vectors (the model is not constant).
    assert (served[0] @ served[1]) < 0.99


def _ensemble_counts(url: str) -> tuple[int, int]:
    client = grpcclient.InferenceServerClient(url)
    try:
        stats = client.get_inference_statistics("imgsearch").model_stats[0]
        return stats.inference_stats.success.count, stats.inference_count
    finally:
        client.close()


async def test_concurrent_calls_are_batched_into_few_requests(triton, images):
    embedder = TritonEmbedder(triton.grpc_url, max_batch=8, batch_window_s=0.02)
    try:
        first_before = _ensemble_counts(triton.grpc_url)
        alone = await embedder.embed(images[:1], timeout_s=TIMEOUT_S)
        for _ in range(50):  # Triton counts a request just after it answers it
            requests_before, items_before = _ensemble_counts(triton.grpc_url)
            if items_before > first_before[1]:
                break
            await asyncio.sleep(0.1)
        results = await asyncio.gather(*(embedder.embed([img], timeout_s=TIMEOUT_S) for img in images))
        for _ in range(50):  # Triton counts a request just after it answers it (a busy box: read too early once)
            requests_after, items_after = _ensemble_counts(triton.grpc_url)
            if items_after - items_before >= len(images):
                break
            await asyncio.sleep(0.1)
    finally:
        await embedder.close()
    assert items_after - items_before == len(images)
    assert requests_after - requests_before == 1  # 7 calls, one Triton request
    np.testing.assert_allclose(results[0], alone, atol=1e-5)
    assert all(r.shape == (1, 512) for r in results)


async def test_a_dns_url_as_deploy_gives_it_embeds_the_same(triton, images):
    """deploy/ points the broker at `dns:///<headless service>:8001` (requests round-robin over Triton pods)."""
    by_dns = TritonEmbedder(f"dns:///localhost:{triton.grpc_url.rsplit(':', 1)[1]}", max_batch=8)
    plain = TritonEmbedder(triton.grpc_url, max_batch=8)
    try:
        np.testing.assert_allclose(await by_dns.embed(images[:2], timeout_s=TIMEOUT_S),
                                   await plain.embed(images[:2], timeout_s=TIMEOUT_S), atol=1e-5)
    finally:
        await by_dns.close()
        await plain.close()


async def test_a_batch_larger_than_the_models_limit_is_split_not_refused(triton, images):
    """The broker's embed_max_batch (32 by default) and the served model's max_batch_size (8 here) are set in two
    places; Triton refuses a bigger batch with INVALID_ARGUMENT, which used to reach every caller as INTERNAL.
    The client reads the model's limit from Triton and never sends more."""
    many = images * 3  # 24 images, one call
    embedder = TritonEmbedder(triton.grpc_url, max_batch=32)
    reference = TritonEmbedder(triton.grpc_url, max_batch=8)
    try:
        served = await embedder.embed(many, timeout_s=TIMEOUT_S)
        expected = await reference.embed(many, timeout_s=TIMEOUT_S)
        together = await asyncio.gather(*(embedder.embed(images, timeout_s=TIMEOUT_S) for _ in range(3)))
    finally:
        await embedder.close()
        await reference.close()
    assert served.shape == (len(many), 512)
    np.testing.assert_allclose(served, expected, atol=1e-5)
    np.testing.assert_allclose(np.concatenate(together), expected, atol=1e-5)


async def test_a_bad_image_fails_only_its_caller(triton, images):
    embedder = TritonEmbedder(triton.grpc_url, max_batch=8, batch_window_s=0.02)
    truncated = (ODD / "imagededup" / "mixed_images" / "ukbench09268_corrupt.jpg").read_bytes()
    try:
        results = await asyncio.gather(
            embedder.embed([images[0]], timeout_s=TIMEOUT_S),
            embedder.embed([truncated], timeout_s=TIMEOUT_S),
            embedder.embed([images[1]], timeout_s=TIMEOUT_S),
            return_exceptions=True,
        )
        assert isinstance(results[1], InvalidImageError), results[1]
        assert "decodable" in str(results[1])
        assert results[0].shape == (1, 512) and results[2].shape == (1, 512)
        with pytest.raises(InvalidImageError):
            await embedder.embed([b"definitely not an image"], timeout_s=TIMEOUT_S)
        # A decompression bomb is refused by the server's preprocessing model, as too large.
        buf = io.BytesIO()
        Image.new("1", (12_000, 10_000)).save(buf, format="PNG")
        with pytest.raises(ImageTooLargeError):
            await embedder.embed([buf.getvalue()], timeout_s=TIMEOUT_S)
        # The models survived all of it.
        assert await embedder.ready(timeout_s=5)
        assert (await embedder.embed([images[2]], timeout_s=TIMEOUT_S)).shape == (1, 512)
    finally:
        await embedder.close()


async def test_limits_deadlines_and_readiness(triton, images):
    embedder = TritonEmbedder(triton.grpc_url, max_image_bytes=1000)
    try:
        with pytest.raises(ImageTooLargeError):  # refused by the client, nothing sent
            await embedder.embed([images[0]], timeout_s=TIMEOUT_S)
    finally:
        await embedder.close()
    embedder = TritonEmbedder(triton.grpc_url, batch_window_s=0)
    try:
        with pytest.raises(EmbedderTimeoutError):
            await embedder.embed(images[:4], timeout_s=0.001)
        assert (await embedder.embed([], timeout_s=1)).shape == (0, 512)
    finally:
        await embedder.close()
    wrong_model = TritonEmbedder(triton.grpc_url, model_name="no_such_model")
    try:
        assert not await wrong_model.ready(timeout_s=5)
        with pytest.raises(EmbedderUnavailableError):
            await wrong_model.embed(images[:1], timeout_s=TIMEOUT_S)
    finally:
        await wrong_model.close()


def test_metrics_endpoint(triton):
    text = urllib.request.urlopen(triton.metrics_url, timeout=10).read().decode()
    assert 'nv_inference_request_success{model="imgsearch",version="1"}' in text
    assert "nv_inference_queue_duration_us" in text


async def test_stopped_triton_is_unavailable_fast(tmp_path, images):
    server = start_triton(_repository(tmp_path / "repo"))
    embedder = TritonEmbedder(server.grpc_url)
    try:
        assert (await embedder.embed(images[:1], timeout_s=TIMEOUT_S)).shape == (1, 512)
        server.stop()
        assert not server.is_running()
        started = time.monotonic()
        with pytest.raises(EmbedderUnavailableError):
            await embedder.embed(images[:1], timeout_s=TIMEOUT_S)
        assert time.monotonic() - started < 2.0
        assert not await embedder.ready(timeout_s=2)
    finally:
        await embedder.close()
        server.stop()
    # Never started at all: the same error.
    nobody = TritonEmbedder(f"127.0.0.1:{free_port()}")
    try:
        with pytest.raises(EmbedderUnavailableError):
            await nobody.embed(images[:1], timeout_s=TIMEOUT_S)
    finally:
        await nobody.close()


async def test_serve_command_runs_until_interrupted(images):
    grpc_port, http_port, metrics_port = free_port(), free_port(), free_port()
    command = [sys.executable, "-m", "embedder.cli", "serve", "--grpc-port", str(grpc_port),
               "--http-port", str(http_port), "--metrics-port", str(metrics_port), "--max-batch-size", "8"]
    process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               start_new_session=True)
    embedder = TritonEmbedder(f"127.0.0.1:{grpc_port}")
    try:
        deadline = time.monotonic() + 120
        while not await embedder.ready(timeout_s=2):
            assert process.poll() is None, process.stdout.read().decode(errors="replace")[-3000:]
            assert time.monotonic() < deadline, "serve did not become ready"
            await asyncio.sleep(0.5)
        assert (await embedder.embed(images[:2], timeout_s=TIMEOUT_S)).shape == (2, 512)
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read()
        assert b"nv_inference_request_success" in metrics
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=60) == 0
        output = process.stdout.read().decode(errors="replace")
        assert "Triton ready" in output
        assert not await embedder.ready(timeout_s=2)
    finally:
        await embedder.close()
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def test_a_broken_model_fails_start_with_triton_log(tmp_path):
    repo = _repository(tmp_path / "repo")
    (repo / "imgsearch_embedding" / "1" / "model.onnx").write_bytes(b"not an onnx graph")
    with pytest.raises(TritonStartError) as excinfo:
        start_triton(repo, startup_timeout_s=120)
    message = str(excinfo.value)
    assert "tritonserver exited" in message
    assert "imgsearch_embedding" in message  # the log tail says which model failed


def test_triton_environment_for_the_python_backend():
    env = triton_environment({"PATH": "/usr/bin"})
    import sysconfig

    assert sysconfig.get_config_var("LIBDIR") in env["LD_LIBRARY_PATH"].split(":")
    assert str(REPO_ROOT) in env["PYTHONPATH"].split(":")
    assert env["PATH"].split(":")[0] == str(Path(sys.executable).parent)


def test_a_start_on_the_port_of_another_triton_fails_instead_of_reporting_it_ready(triton, tmp_path):
    """Readiness was asked of whatever answered on the port: a second server started on a running one's gRPC port
    was reported ready at once (the other one answered), then exited with "already in use" (review)."""
    with pytest.raises(TritonStartError, match="already in use"):
        start_triton(_repository(tmp_path / "repo"), grpc_port=triton.grpc_port, startup_timeout_s=120)
    assert triton.is_running()


async def test_a_model_reloaded_with_a_smaller_batch_limit_is_sent_the_batch_again_in_parts(triton, images):
    """The client read the model's max_batch_size (here as if it had read 32 before the model was reloaded with
    8): Triton refuses the batch, and its callers failed with INTERNAL (review of 2026-12-06). The limit is read
    again and the batch sent in parts, once."""
    many = images * 3  # 24 images, one call
    embedder = TritonEmbedder(triton.grpc_url, max_batch=32)
    reference = TritonEmbedder(triton.grpc_url, max_batch=8)
    try:
        embedder._model_max_batch = 32  # what it read before the reload
        served = await embedder.embed(many, timeout_s=TIMEOUT_S)
        assert embedder._model_max_batch == 8
        expected = await reference.embed(many, timeout_s=TIMEOUT_S)
    finally:
        await embedder.close()
        await reference.close()
    np.testing.assert_allclose(served, expected, atol=1e-5)


def test_a_dead_backend_process_is_unavailable_not_internal():
    """A python-backend stub that died (OOM-killed) fails every call with INTERNAL "Stub process ... is not
    healthy" until Triton restarts: that is an outage of that server (UNAVAILABLE), not a fault of ours."""
    from tritonclient.utils import InferenceServerException

    from embedder.client import triton_error
    from embedder.errors import EmbedderUnavailableError

    dead = InferenceServerException(
        msg="in ensemble 'imgsearch', Stub process 'imgsearch_preprocess_0_0' is not healthy.",
        status="StatusCode.INTERNAL")
    assert isinstance(triton_error(dead), EmbedderUnavailableError)


async def test_a_batch_refused_for_its_size_with_no_time_left_to_reread_the_limit_is_a_deadline_error():
    """With the limit unreadable in the time left, the whole batch went again, was refused again, and the caller
    got UNAVAILABLE (which clients retry) for what was its deadline (review of 2026-12-06). A stand-in for
    tritonclient's client (a unit test of TritonEmbedder): refusals come at once, a config read takes 5 ms."""
    from tritonclient.utils import InferenceServerException

    from embedder.errors import EmbedderTimeoutError

    class ReloadedTriton:
        def __init__(self):
            self.calls = []

        async def get_model_config(self, name, as_json, client_timeout):
            self.calls.append("config")
            await asyncio.sleep(min(0.005, client_timeout))
            if client_timeout < 0.005:
                raise InferenceServerException("Deadline Exceeded", status="StatusCode.DEADLINE_EXCEEDED")
            return {"config": {"max_batch_size": 8}}

        async def infer(self, model, inputs, outputs, client_timeout, timeout):
            self.calls.append(inputs[0].shape()[0])
            raise InferenceServerException("inference request batch-size must be <= 8 for 'imgsearch'",
                                           status="StatusCode.INVALID_ARGUMENT")

    embedder = TritonEmbedder("stand-in:1")
    embedder._client = stand_in = ReloadedTriton()
    embedder._model_max_batch = 32  # read before the reload
    with pytest.raises(EmbedderTimeoutError):
        await embedder._infer([b"x"] * 24, 0.003)
    assert stand_in.calls == [24, "config"]  # not the whole batch again
