"""The broker server on its own (in-process, real gRPC on loopback): health gate, TLS, write token, limits.
Its dependencies are unreachable addresses here, which is exactly what the health gate is about; the full
stack is exercised in test_e2e_broker.py."""

from __future__ import annotations

import asyncio
import io
import shutil
import subprocess

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from broker.client import BrokerClient
from broker.config import BrokerConfig
from broker.routing import ShardMap
from broker.server import start_broker
from broker.service import BrokerService
from broker.stack import free_port
from broker.types import CatalogueItem, IngestSummary
from imgsearch.errors import (
    ImgsearchError,
    InvalidArgumentError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
)
from imgsearch.serving import ServerOptions
from imgsearch.v1 import broker_pb2


def _config(**server) -> BrokerConfig:
    dead = f"127.0.0.1:{free_port()}"
    return BrokerConfig(
        server=ServerOptions(host="127.0.0.1", port=0, **server),
        shard_map=ShardMap(shards={"s0": (dead,), "s1": (f"127.0.0.1:{free_port()}",)}),
        triton_url=f"127.0.0.1:{free_port()}",
        write_token="secret",
        health_check_interval_s=0.2,
    )


async def _health(channel) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return (
        await stub.Check(health_pb2.HealthCheckRequest(service="imgsearch.v1.BrokerService"), timeout=2)
    ).status


async def _reflected_services(channel) -> list[str]:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    async for response in stub.ServerReflectionInfo(iter([request]), timeout=2):
        return [s.name for s in response.list_services_response.service]
    return []


async def test_not_serving_until_dependencies_reachable_and_typed_errors():
    handle = await start_broker(_config())
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{handle.port}") as channel:
            await asyncio.sleep(0.6)
            assert await _health(channel) == health_pb2.HealthCheckResponse.NOT_SERVING
            assert "imgsearch.v1.BrokerService" in await _reflected_services(channel)
        async with BrokerClient(f"127.0.0.1:{handle.port}", timeout_s=3) as client:
            stats = await client.stats()
            assert [(s.shard, s.reachable) for s in stats] == [("s0", False), ("s1", False)]
            # vector search: every shard down -> partial, empty, not an error
            answer = await client.search(vector=[1.0] * 512, top_k=3, timeout_s=2)
            assert answer.partial and not answer.hits
            assert {s.outcome for s in answer.shards} <= {"unavailable", "timeout"}
            # image search needs Triton: UNAVAILABLE
            buf = io.BytesIO()
            Image.new("RGB", (64, 48), "red").save(buf, format="PNG")
            with pytest.raises(UnavailableError):
                await client.search(image=buf.getvalue(), top_k=3, timeout_s=3)
            with pytest.raises(InvalidArgumentError):
                await client.search(vector=[1.0] * 3, top_k=3)
            with pytest.raises(UnauthenticatedError):
                await client.ingest(
                    CatalogueItem(image_id="a", product_id="p", category="c", vector=[1.0] * 512)
                )
        async with BrokerClient(f"127.0.0.1:{handle.port}", token="nope") as client:
            with pytest.raises(PermissionDeniedError):
                await client.delete(["a"])
        async with BrokerClient(f"127.0.0.1:{handle.port}", token="secret") as client:
            with pytest.raises(UnavailableError):  # authorised, but no shard to write to
                await client.delete(["a"], timeout_s=2)
    finally:
        await handle.stop(0)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl CLI needed to make a test certificate")
async def test_tls(tmp_path):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )
    handle = await start_broker(_config(tls_cert_file=cert, tls_key_file=key))
    try:
        async with BrokerClient(f"localhost:{handle.port}", root_certificates=cert.read_bytes()) as client:
            assert len(await client.stats()) == 2
        async with BrokerClient(f"127.0.0.1:{handle.port}", timeout_s=2) as plaintext:
            with pytest.raises(UnavailableError):
                await plaintext.stats()
    finally:
        await handle.stop(0)


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, "UNAUTHENTICATED"),
        ("", "UNAUTHENTICATED"),
        ("Bearer", "UNAUTHENTICATED"),
        ("Bearer   ", "UNAUTHENTICATED"),
        ("Bearer wrong", "PERMISSION_DENIED"),
        ("Basic s3cret", "PERMISSION_DENIED"),
        ("Bearer s3cret", None),
        ("bearer  s3cret ", None),
    ],
)
def test_writes_without_credentials_are_unauthenticated_and_with_wrong_ones_denied(header, expected):
    """No token at all (no header, or a Bearer header with nothing after it) is UNAUTHENTICATED; a token that
    is not the write token is PERMISSION_DENIED."""
    class Context:
        def invocation_metadata(self):
            return () if header is None else (("authorization", header),)

    service = BrokerService(None, search_timeout_s=1, ingest_timeout_s=1, write_token="s3cret")
    if expected is None:
        service._authorise_write(Context())
        return
    with pytest.raises(ImgsearchError) as raised:
        service._authorise_write(Context())
    assert raised.value.code.name == expected


class _StreamContext:
    def invocation_metadata(self):
        return ()

    def time_remaining(self):
        return None


class _HeldIngests:
    """A broker stand-in (the unit under test is the servicer's stream handling): each ingest holds its chunk
    until released, and the chunks' upload bytes in flight are recorded."""

    def __init__(self):
        self.in_flight, self.peak, self.release = 0, 0, asyncio.Event()

    async def ingest(self, items, *, timeout_s):
        size = sum(len(item.image or b"") for item in items)
        self.in_flight += size
        self.peak = max(self.peak, self.in_flight)
        await self.release.wait()
        self.in_flight -= size
        return IngestSummary(ingested=len(items), cache_pending=0)


async def test_ingest_streams_hold_at_most_the_byte_budget_across_streams():
    """Each IngestStream ran 4 chunks of 32 images at once, with nothing bounding the upload bytes held across
    streams (an ingest review: one stream of 9.5 MB images held 1.6 GB, three streams 3.7 GB). Chunks now wait
    for room in a byte budget shared by all streams, and are cut at 16 MiB."""
    broker = _HeldIngests()
    budget = 24 * 1024 * 1024
    service = BrokerService(broker, search_timeout_s=1, ingest_timeout_s=30, ingest_chunk_size=32,
                            max_ingest_bytes_in_flight=budget)
    image = b"x" * (3 * 1024 * 1024)

    async def messages(stream: int):
        for i in range(40):
            yield broker_pb2.IngestStreamRequest(item=broker_pb2.CatalogueItem(
                image_id=f"s{stream}-{i}", product_id="p", category="c", image=image))

    streams = [asyncio.ensure_future(service.IngestStream(messages(s), _StreamContext())) for s in range(3)]
    await asyncio.sleep(0.2)
    assert 0 < broker.peak <= budget  # 3 streams x 40 x 3 MiB = 360 MiB offered
    broker.release.set()
    answers = await asyncio.gather(*streams)
    assert [a.ingested for a in answers] == [40, 40, 40]
    assert broker.peak <= budget


class _DeadlineContext(_StreamContext):
    def __init__(self, timeout_s: float):
        self._deadline = asyncio.get_running_loop().time() + timeout_s

    def time_remaining(self):
        return max(0.0, self._deadline - asyncio.get_running_loop().time())


def _sized_messages(stream: str, sizes: list[int]):
    async def messages():
        for i, size in enumerate(sizes):
            yield broker_pb2.IngestStreamRequest(item=broker_pb2.CatalogueItem(
                image_id=f"{stream}-{i}", product_id="p", category="c", image=b"x" * size))
    return messages()


def _messages(stream: str, count: int, size: int):
    return _sized_messages(stream, [size] * count)


async def test_a_failed_chunk_is_the_stream_s_answer_while_its_next_chunk_waits_for_room():
    """A stream whose first chunk failed (INVALID_ARGUMENT) while its next chunk waited for room held by another
    stream got DEADLINE_EXCEEDED from the wait instead (a review): the failure now ends the wait."""

    class FirstChunkRefused(_HeldIngests):
        async def ingest(self, items, *, timeout_s):
            if items[0].image_id.startswith("a-"):
                raise InvalidArgumentError(f"{items[0].image_id}: refused")
            return await super().ingest(items, timeout_s=timeout_s)

    broker = FirstChunkRefused()
    service = BrokerService(broker, search_timeout_s=1, ingest_timeout_s=30, ingest_chunk_size=2,
                            max_ingest_bytes_in_flight=10_000)
    holder = asyncio.ensure_future(service.IngestStream(_messages("b", 2, 4_000), _StreamContext()))  # 8 kB held
    await asyncio.sleep(0.05)
    started = asyncio.get_running_loop().time()
    with pytest.raises(InvalidArgumentError, match="refused"):
        # The first chunk (2 x 500 bytes) fits beside the other stream's and is refused; the second (2 x 1,500)
        # does not fit until the other stream ends.
        await service.IngestStream(_sized_messages("a", [500, 500, 1_500, 1_500]), _DeadlineContext(1.0))
    assert asyncio.get_running_loop().time() - started < 0.5
    broker.release.set()
    assert (await holder).ingested == 2
    assert service._ingest_bytes._free == 10_000  # every byte given back


async def test_streams_beyond_the_limit_wait_for_a_turn_then_are_resource_exhausted():
    broker = _HeldIngests()
    service = BrokerService(broker, search_timeout_s=1, ingest_timeout_s=30, max_ingest_streams=2)
    running = [asyncio.ensure_future(service.IngestStream(_messages(f"s{i}", 1, 10), _StreamContext()))
               for i in range(2)]
    await asyncio.sleep(0.05)
    with pytest.raises(ResourceExhaustedError):
        await service.IngestStream(_messages("late", 1, 10), _DeadlineContext(0.2))
    waiting = asyncio.ensure_future(service.IngestStream(_messages("patient", 1, 10), _DeadlineContext(5)))
    await asyncio.sleep(0.05)
    broker.release.set()
    assert [a.ingested for a in await asyncio.gather(*running, waiting)] == [1, 1, 1]
