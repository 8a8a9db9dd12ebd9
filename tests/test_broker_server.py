"""The broker server on its own (in-process, real gRPC on loopback): health gate, TLS, write token, limits.
Its dependencies are unreachable addresses here, which is exactly what the health gate is about; the full
stack is exercised in test_e2e_broker.py."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import re
import shutil
import subprocess

import grpc
import numpy as np
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
    DeadlineExceededError,
    ImgsearchError,
    InvalidArgumentError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
)
from imgsearch.serving import ServerOptions
from imgsearch.v1 import broker_pb2
from shard_server.types import Exactness


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


async def test_a_broker_started_during_a_partial_outage_serves_after_its_wait(tmp_path):
    """A broker started while one shard (and Triton) were down stayed NOT_SERVING for the whole outage, though it
    answered exactly like a peer started before it: a restart during a partial outage took it out of the load
    balancer. It now serves once its wait is over and one shard is reachable; with nothing reachable it waits on."""
    from shard_server.config import ShardConfig
    from shard_server.server import start_shard_server

    shard = await start_shard_server(ShardConfig(data_dir=tmp_path / "shard", dimension=512))
    partial = dataclasses.replace(
        _config(), shard_map=ShardMap(shards={"s0": (f"127.0.0.1:{free_port()}",), "s1": (f"127.0.0.1:{shard.port}",)}),
        ready_wait_s=1.0)
    nothing = dataclasses.replace(_config(), ready_wait_s=0.0)
    up, down = await start_broker(partial), await start_broker(nothing)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{up.port}") as channel:
            assert await _health(channel) == health_pb2.HealthCheckResponse.NOT_SERVING  # still waiting
            for _ in range(50):
                await asyncio.sleep(0.2)
                if await _health(channel) == health_pb2.HealthCheckResponse.SERVING:
                    break
            else:
                pytest.fail("a broker with one of two shards reachable never served")
        async with grpc.aio.insecure_channel(f"127.0.0.1:{down.port}") as channel:
            assert await _health(channel) == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        await up.stop(0)
        await down.stop(0)
        await shard.stop(snapshot=False)


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


def _self_signed(tmp_path, name: str):
    """A self-signed certificate for localhost/127.0.0.1 and its key (it serves as its own CA)."""
    key, cert = tmp_path / f"{name}-key.pem", tmp_path / f"{name}-cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "1", "-subj", f"/CN={name}", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True,
    )
    return cert, key


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl CLI needed to make a test certificate")
async def test_mutual_tls_from_the_client_to_the_broker_and_from_the_broker_to_a_shard(tmp_path):
    """The shards could not serve TLS at all (the documented --shard-tls-ca-file found none), and neither the
    clients nor the broker could present a certificate to a server that requires one."""
    from shard_server.config import ShardConfig
    from shard_server.server import start_shard_server

    server_cert, server_key = _self_signed(tmp_path, "server")
    client_cert, client_key = _self_signed(tmp_path, "client")
    shard = await start_shard_server(ShardConfig(
        data_dir=tmp_path / "shard", dimension=8, tls_cert_file=server_cert, tls_key_file=server_key,
        tls_client_ca_file=client_cert))
    config = BrokerConfig(
        server=ServerOptions(host="127.0.0.1", port=0, tls_cert_file=server_cert, tls_key_file=server_key,
                             tls_client_ca_file=client_cert),
        shard_map=ShardMap(shards={"s0": (f"localhost:{shard.port}",)}),
        triton_url=f"127.0.0.1:{free_port()}",
        shard_tls_ca_file=server_cert, shard_tls_cert_file=client_cert, shard_tls_key_file=client_key,
        health_check_interval_s=0.2,
    )
    handle = await start_broker(config)
    try:
        tls = {"root_certificates": server_cert.read_bytes()}
        async with BrokerClient(f"localhost:{handle.port}", certificate_chain=client_cert.read_bytes(),
                                private_key=client_key.read_bytes(), **tls) as client:
            [summary] = await client.stats(timeout_s=5)
            assert summary.reachable  # the broker's own client certificate got it through to the shard
        async with BrokerClient(f"localhost:{handle.port}", timeout_s=2, **tls) as no_certificate:
            with pytest.raises(UnavailableError):
                await no_certificate.stats()
    finally:
        await handle.stop(0)
        await shard.stop(snapshot=False)


def test_a_client_key_without_its_certificate_is_refused_not_sent_in_plaintext():
    with pytest.raises(ValueError, match="certificate"):
        BrokerClient("127.0.0.1:1", private_key=b"key")


@pytest.mark.parametrize("argv", [
    ["--tls-cert-file", "cert.pem"],  # say, a mistyped IMGSEARCH_TLS_KEY_FILE
    ["--tls-key-file", "key.pem"],
    ["--tls-client-ca-file", "ca.pem"],
    ["--shard-tls-ca-file", "ca.pem", "--shard-tls-cert-file", "cert.pem"],
    ["--shard-tls-cert-file", "cert.pem", "--shard-tls-key-file", "key.pem"],
])
def test_half_a_tls_setting_refuses_to_start_instead_of_serving_plaintext(argv, capsys):
    with pytest.raises(SystemExit):
        BrokerConfig.from_env(["--shard-map", '{"shards": {"s0": ["127.0.0.1:1"]}}', *argv])
    assert "tls" in capsys.readouterr().err.lower()


def test_the_brokers_shard_client_certificate_is_not_read_by_the_shards(monkeypatch, tmp_path):
    """The broker read its client certificate for the shards from IMGSEARCH_SHARD_TLS_CERT_FILE/_KEY_FILE, the
    names a shard reads its own server certificate from: `imgsearch up` hands one environment to every process, so
    the shards served TLS with the broker's client certificate (from a docs audit)."""
    from shard_server.config import ShardConfig

    env = {"IMGSEARCH_SHARD_TLS_CA_FILE": "ca.pem", "IMGSEARCH_BROKER_SHARD_TLS_CERT_FILE": "client.pem",
           "IMGSEARCH_BROKER_SHARD_TLS_KEY_FILE": "client.key"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    broker = BrokerConfig.from_env(["--shard-map", '{"shards": {"s0": ["127.0.0.1:1"]}}'])
    assert (str(broker.shard_tls_cert_file), str(broker.shard_tls_key_file)) == ("client.pem", "client.key")
    shard = ShardConfig.from_env(["--data-dir", str(tmp_path)], env=env)
    assert shard.tls_cert_file is None and shard.tls_key_file is None


@pytest.mark.parametrize("argv", [["--tls-cert-file", "cert.pem"], ["--tls-client-ca-file", "ca.pem"]])
def test_a_shard_with_half_a_tls_setting_refuses_to_start(argv, tmp_path, capsys):
    from shard_server.config import ShardConfig

    with pytest.raises(SystemExit):
        ShardConfig.from_env(["--data-dir", str(tmp_path), *argv], env={})
    assert "tls" in capsys.readouterr().err.lower()


@pytest.mark.parametrize(("argv", "setting"), [
    (["--ingest-concurrency", "0"], "ingest_concurrency"),  # every IngestStream waited for good
    (["--redis-timeout-s", "0"], "redis_timeout_s"),  # the cache always timed out
    (["--search-timeout-s", "-1"], "search_timeout_s"),
    (["--ingest-timeout-s", "nan"], "ingest_timeout_s"),
    (["--near-min-similarity", "nan"], "near_min_similarity"),  # no near duplicate ever confirmed
    (["--max-ingest-streams", "0"], "max_ingest_streams"),
    (["--max-search-streams", "0"], "max_search_streams"),  # every SearchStream refused
    (["--shutdown-grace-s", "nan"], "shutdown_grace_s"),  # accepted, and handed to grpc's stop (review)
    (["--shutdown-grace-s", "-1"], "shutdown_grace_s"),
    (["--max-message-bytes", "0"], "max_message_bytes"),
])
def test_a_broker_setting_that_would_break_it_refuses_to_start(argv, setting, capsys):
    """These were accepted silently (review of 2026-12-05)."""
    with pytest.raises(SystemExit):
        BrokerConfig.from_env(["--shard-map", '{"shards": {"s0": ["127.0.0.1:1"]}}', *argv])
    assert setting in capsys.readouterr().err


def test_the_search_stream_limit_is_a_server_setting_of_broker_and_shard(monkeypatch, tmp_path):
    from shard_server.config import ShardConfig

    monkeypatch.setenv("IMGSEARCH_MAX_SEARCH_STREAMS", "100")
    assert BrokerConfig.from_env(["--shard-map", '{"shards": {"s0": ["127.0.0.1:1"]}}']).server.max_search_streams == 100
    monkeypatch.delenv("IMGSEARCH_MAX_SEARCH_STREAMS")
    assert BrokerConfig.from_env(["--shard-map", '{"shards": {"s0": ["127.0.0.1:1"]}}']).server.max_search_streams == 2048
    shard = ShardConfig.from_env(["--data-dir", str(tmp_path)], env={"IMGSEARCH_SHARD_MAX_SEARCH_STREAMS": "7"})
    assert shard.server_options().max_search_streams == 7


@pytest.mark.parametrize("argv", [["--snapshot-interval-s", "nan"], ["--tombstone-ttl-s", "inf"],
                                  ["--max-records-per-request", "-1"], ["--max-search-streams", "0"]])
def test_a_shard_setting_that_is_not_a_finite_non_negative_number_refuses_to_start(argv, tmp_path, capsys):
    from shard_server.config import ShardConfig

    with pytest.raises(SystemExit):
        ShardConfig.from_env(["--data-dir", str(tmp_path), *argv], env={})
    assert argv[0].removeprefix("--").replace("-", "_") in capsys.readouterr().err


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
        (("Bearer wrong", "Bearer s3cret"), "PERMISSION_DENIED"),
        (("Bearer s3cret", "Bearer s3cret"), "PERMISSION_DENIED"),
    ],
)
def test_writes_without_credentials_are_unauthenticated_and_with_wrong_ones_denied(header, expected):
    """No token at all (no header, or a Bearer header with nothing after it) is UNAUTHENTICATED; a token that
    is not the write token is PERMISSION_DENIED, and so are several authorization headers (the last one decided,
    so a wrong token followed by the right one was let in: review)."""
    class Context:
        def invocation_metadata(self):
            if header is None:
                return ()
            return tuple(("authorization", h) for h in header) if isinstance(header, tuple) else (("authorization", header),)

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
    for _ in range(100):  # until the first chunks reach the broker (slower on a busy box)
        await asyncio.sleep(0.05)
        if broker.peak:
            break
    await asyncio.sleep(0.2)  # and the rest have had their chance to overrun the budget
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
    started = asyncio.get_running_loop().time()
    with pytest.raises(ResourceExhaustedError):
        await service.IngestStream(_messages("late", 1, 10), _DeadlineContext(0.2))
    # before the caller's own deadline, or the caller's DEADLINE_EXCEEDED arrives first and says nothing of why
    # (review of 2026-12-05: it was always DEADLINE_EXCEEDED through gRPC)
    assert asyncio.get_running_loop().time() - started < 0.195
    waiting = asyncio.ensure_future(service.IngestStream(_messages("patient", 1, 10), _DeadlineContext(5)))
    await asyncio.sleep(0.05)
    broker.release.set()
    assert [a.ingested for a in await asyncio.gather(*running, waiting)] == [1, 1, 1]


async def test_a_stream_that_stops_sending_without_closing_gives_its_turn_back():
    """A client that sent one item and then neither sent more nor closed its stream held its turn for good: 8 such
    streams blocked every later IngestStream (review of 2026-12-05: still blocked after 82 s, with a 60 s write
    timeout). Each message must now come within the write timeout; a stream that keeps sending is not cut short."""
    broker = _HeldIngests()
    broker.release.set()
    service = BrokerService(broker, search_timeout_s=1, ingest_timeout_s=0.5, max_ingest_streams=1)
    stalled = asyncio.Event()

    async def one_then_silence():
        yield broker_pb2.IngestStreamRequest(item=broker_pb2.CatalogueItem(
            image_id="silent-0", product_id="p", category="c", image=b"x"))
        await stalled.wait()  # never set: the client neither sends nor closes

    async def slow_but_steady():
        for i in range(4):
            await asyncio.sleep(0.3)  # under the 0.5 s per message, 1.2 s in all
            yield broker_pb2.IngestStreamRequest(item=broker_pb2.CatalogueItem(
                image_id=f"steady-{i}", product_id="p", category="c", image=b"x"))

    started = asyncio.get_running_loop().time()
    with pytest.raises(DeadlineExceededError, match="no message"):
        await service.IngestStream(one_then_silence(), _StreamContext())
    assert asyncio.get_running_loop().time() - started < 2
    assert (await service.IngestStream(slow_but_steady(), _StreamContext())).ingested == 4  # the turn is free


async def test_streams_too_slow_to_fill_a_chunk_give_their_turns_up_to_streams_that_wait():
    """Clients trickling one item just inside the write timeout held every IngestStream turn for as long as they
    liked, and every other stream was refused (review of 2026-12-06: two such streams, 39 s of refusals with a 4 s
    timeout). While a stream waits for a turn, one that has not filled its chunk within the write timeout is ended
    (RESOURCE_EXHAUSTED, its unfilled chunk not stored) and the waiting stream gets the turn; with nobody waiting
    a slow stream goes on (the test above)."""
    broker = _HeldIngests()
    broker.release.set()
    service = BrokerService(broker, search_timeout_s=1, ingest_timeout_s=0.5, ingest_chunk_size=4,
                            max_ingest_streams=1)
    sent = []

    async def trickle():
        for i in range(100):
            await asyncio.sleep(0.3)  # inside the 0.5 s per message, but 4 items take 1.2 s
            sent.append(i)
            yield broker_pb2.IngestStreamRequest(item=broker_pb2.CatalogueItem(
                image_id=f"trickle-{i}", product_id="p", category="c", image=b"x"))

    slow = asyncio.ensure_future(service.IngestStream(trickle(), _StreamContext()))
    await asyncio.sleep(0.1)
    started = asyncio.get_running_loop().time()
    waiting = await service.IngestStream(_messages("patient", 1, 10), _DeadlineContext(5))
    assert waiting.ingested == 1
    assert asyncio.get_running_loop().time() - started < 1.5  # not the trickle's 30 s
    with pytest.raises(ResourceExhaustedError, match="while other streams waited for a turn"):
        await slow
    assert len(sent) < 10


@pytest.mark.parametrize(
    ("arguments", "says"),
    [
        ({"vector": [1.0] * 4, "top_k": 2**40}, "top_k must be at most 2147483647"),
        ({"vector": [1.0] * 4, "nprobe": -5}, "nprobe must be a whole number of at least 0, got -5"),
        # not "from 1 to 2147483647", as if that were the range: the broker's is 1..1000 (docs review)
        ({"vector": [1.0] * 4, "top_k": 0}, "top_k must be a whole number of at least 1, got 0"),
        ({"vector": [1.0] * 4, "top_k": 2.5}, "top_k must be a whole number"),
        ({"vector": [1.0] * 4, "image": b"jpeg"}, "one of image, vector and image_id, got image and vector"),
        ({"vector": np.ones((2, 2), np.float32)}, "one-dimensional, got shape (2, 2)"),
        ({"vector": [1.0] * 4, "top_k": True}, "top_k must be a whole number"),
        ({"image": "photo.jpg"}, "image must be the encoded file's bytes, got str"),
        ({"image_id": 5}, "image_id must be a string, got int"),
        ({"vector": ["a"]}, "vector must be numbers"),
        ({"vector": [1.0] * 4, "categories": [1, 2]}, "categories must be category names"),
        ({"vector": [1.0] * 4, "exactness": "fast"}, "exactness must be an Exactness"),
        ({"vector": [1.0] * 4, "filter": {"price": 1}}, "filter must be a Filter, got dict"),
    ],
    ids=["top_k-overflow", "negative-nprobe", "zero-top_k", "fractional-top_k", "image-and-vector",
         "two-dimensional-vector",
         "bool-top_k", "image-path", "numeric-image-id", "text-vector", "numeric-categories", "exactness-text",
         "filter-dict"],
)
async def test_client_arguments_that_protobuf_would_garble_are_invalid_argument(arguments, says):
    """top_k 2**40 raised protobuf's bare ValueError "Value out of range", an image with a vector sent one of the
    two silently, a (2, 256) array was flattened into one 512-d query (review of 2026-12-05). Nothing is sent."""
    from broker.client import BrokerClient, SyncBrokerClient
    from imgsearch.errors import InvalidArgumentError

    async with BrokerClient("127.0.0.1:1") as client:
        with pytest.raises(InvalidArgumentError, match=re.escape(says)):
            await client.search(**arguments, timeout_s=1)
    with SyncBrokerClient("127.0.0.1:1") as client, pytest.raises(InvalidArgumentError, match=re.escape(says)):
        client.search(**arguments, timeout_s=1)


def test_one_category_given_as_a_string_is_that_category():
    """categories="Milk" was read letter by letter as four categories M, i, l, k: 0 hits, no error (review)."""
    from broker.client import _search_request

    request = _search_request({"self": None, "image": None, "vector": [1.0] * 4, "image_id": None, "top_k": 3,
                               "categories": "Milk", "filter": None, "exactness": Exactness.DEFAULT,
                               "nprobe": np.int64(4), "use_duplicate_cache": True, "distinct_products": False,
                               "timeout_s": None})
    assert list(request.categories) == ["Milk"] and request.options.nprobe == 4
    # a model's output for one image, shape (1, D), is that one vector
    request = _search_request({"self": None, "image": None, "vector": np.ones((1, 4)), "image_id": None,
                               "top_k": 3, "categories": None, "filter": None, "exactness": Exactness.DEFAULT,
                               "nprobe": 0, "use_duplicate_cache": True, "distinct_products": False,
                               "timeout_s": None})
    assert len(request.vector.values) == 4 and list(request.categories) == []


@pytest.mark.parametrize(("token", "code", "hint"), [
    (None, "UNAUTHENTICATED", "requires a write token: set IMGSEARCH_WRITE_TOKEN"),
    ("wrong", "PERMISSION_DENIED", "IMGSEARCH_WRITE_TOKEN is not the broker's write token"),
])
async def test_imgsearch_ingest_refused_for_its_token_says_what_to_set_not_that_part_may_be_stored(
        tmp_path, monkeypatch, capsys, data_dir, token, code, hint):
    """`imgsearch ingest` refused for its token said that part of the images may be stored and that running the
    same command again is safe: nothing was stored, and it fails the same way again (docs review of 2026-12-06);
    `imgsearch delete` already gave the token hint."""
    from broker import cli

    handle = await start_broker(_config())
    try:
        monkeypatch.setenv("IMGSEARCH_BROKER", f"127.0.0.1:{handle.port}")
        monkeypatch.delenv("IMGSEARCH_WRITE_TOKEN", raising=False)
        if token:
            monkeypatch.setenv("IMGSEARCH_WRITE_TOKEN", token)
        photo = next((data_dir / "grocery" / "iconic-images-and-descriptions").rglob("*.jpg"))
        for command in (["ingest", str(photo), "--image-id", "t1", "--category", "Milk"], ["delete", "t1"]):
            assert await asyncio.to_thread(cli.main, command) == 1
            err = capsys.readouterr().err
            assert code in err and hint in err and "may be stored" not in err, err
    finally:
        await handle.stop()
