"""The Python clients (broker.client) as a shop's backend uses them, against a real broker and shard on loopback
ports (vector searches: no Triton): every mistake is an imgsearch.errors type with a clear message, never a raw
grpc, TypeError or AttributeError from inside the library, and a closed client says so (API review of
2026-12-06)."""

from __future__ import annotations

import asyncio
import math

import grpc
import numpy as np
import pytest

from broker.client import BrokerClient, SyncBrokerClient
from broker.config import BrokerConfig
from broker.routing import ShardMap
from broker.server import start_broker
from broker.types import CatalogueItem
from imgsearch.errors import DeadlineExceededError, InvalidArgumentError, UnavailableError
from imgsearch.ports import free_port
from imgsearch.serving import ServerOptions
from shard_server.config import ShardConfig
from shard_server.server import start_shard_server

DIM = 16
TOKEN = "secret"


def _vector(seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)
    return v / np.linalg.norm(v)


@pytest.fixture
async def broker(tmp_path):
    shard = await start_shard_server(ShardConfig(data_dir=tmp_path / "shard", dimension=DIM))
    handle = await start_broker(BrokerConfig(
        server=ServerOptions(host="127.0.0.1", port=0), write_token=TOKEN, dimension=DIM,
        shard_map=ShardMap(shards={"s0": (f"127.0.0.1:{shard.port}",)}), triton_url=f"127.0.0.1:{free_port()}"))
    yield f"127.0.0.1:{handle.port}"
    await handle.stop()
    await shard.stop(snapshot=False)


async def test_a_closed_client_says_so(broker):
    client = BrokerClient(broker, token=TOKEN)
    await client.stats()
    await client.close()
    await client.close()  # twice is fine
    for call in (client.stats(), client.search(vector=_vector(0)), client.delete(["x"]),
                 client.ingest(CatalogueItem(image_id="x", product_id="p", category="c", vector=_vector(1))),
                 client.ingest_stream([])):
        with pytest.raises(UnavailableError, match="closed"):
            await call

    def sync_after_close():
        sync = SyncBrokerClient(broker, token=TOKEN)
        sync.stats()
        sync.close()
        with pytest.raises(UnavailableError, match="closed"):
            sync.wait_until_serving(timeout_s=1)  # a health stub on the closed channel crashed the process
        with pytest.raises(UnavailableError, match="closed"):
            sync.search(vector=_vector(0))

    await asyncio.to_thread(sync_after_close)


class _HungShard(grpc.GenericRpcHandler):
    """A shard that takes every call and never answers (a stand-in: a search in flight is what is tested)."""

    def service(self, handler_call_details):
        async def unary(request, context):
            await asyncio.Event().wait()

        async def stream(requests, context):
            async for _ in requests:
                await asyncio.Event().wait()
            yield b""

        if handler_call_details.method.endswith("Stream"):
            return grpc.stream_stream_rpc_method_handler(stream)
        return grpc.unary_unary_rpc_method_handler(unary)


@pytest.fixture
async def hung_broker():
    """A broker whose one shard never answers: its searches stay in flight."""
    hung = grpc.aio.server()
    hung.add_generic_rpc_handlers((_HungShard(),))
    hung_port = hung.add_insecure_port("127.0.0.1:0")
    await hung.start()
    handle = await start_broker(BrokerConfig(
        server=ServerOptions(host="127.0.0.1", port=0), dimension=DIM, search_timeout_s=30,
        shard_map=ShardMap(shards={"s0": (f"127.0.0.1:{hung_port}",)}), triton_url=f"127.0.0.1:{free_port()}"))
    yield f"127.0.0.1:{handle.port}"
    await handle.stop(grace_s=1)
    await hung.stop(None)


async def test_closing_the_client_ends_the_searches_in_flight(hung_broker):
    """19 of 20 searches in flight when the client was closed waited for their time limit, or for ever."""
    client = BrokerClient(hung_broker, timeout_s=math.inf)
    searches = [asyncio.ensure_future(client.search(vector=_vector(i), timeout_s=math.inf))
                for i in range(20)]
    await asyncio.sleep(1.0)
    assert not any(s.done() for s in searches), [s.exception() or s.result() for s in searches if s.done()]
    await client.close()
    done, pending = await asyncio.wait(searches, timeout=3)
    assert not pending, f"{len(pending)} searches still waiting"
    assert all(isinstance(s.exception(), UnavailableError) for s in done), [s.exception() for s in done]


async def test_mistakes_in_items_timeouts_tokens_and_ids_are_clear_errors(broker):
    async with BrokerClient(broker, token=TOKEN + "\n") as client:  # a token read from a file: its newline
        good = CatalogueItem(image_id="ok", product_id="p", category="c", vector=_vector(1))
        assert (await client.ingest(good)).ingested == 1
        # a (2, 8) array was stored as one 16-d vector, though search refuses it
        with pytest.raises(InvalidArgumentError, match="one-dimensional"):
            await client.ingest(CatalogueItem(image_id="flat", product_id="p", category="c",
                                              vector=np.ones((2, DIM // 2), np.float32)))
        for bad, says in (({"image_id": "x"}, "must be a CatalogueItem"),
                          (CatalogueItem(image_id=5, product_id="p", category="c", vector=_vector(2)), "image_id"),
                          (CatalogueItem(image_id="x", product_id="p", category="c", image="front.jpg"),
                           "read the file first"),
                          (CatalogueItem(image_id="x", product_id="p", category="c", vector=_vector(2),
                                         attributes=None), "attributes")):
            with pytest.raises(InvalidArgumentError, match=says):
                await client.ingest(bad)
        with pytest.raises(InvalidArgumentError, match="CatalogueItems"):
            await client.ingest_stream(None)
        for timeout in ("5", math.nan):
            with pytest.raises(InvalidArgumentError, match="timeout_s must be a number"):
                await client.stats(timeout_s=timeout)
        with pytest.raises(DeadlineExceededError):  # sent, it was stored
            await client.ingest(CatalogueItem(image_id="zero", product_id="p", category="c", vector=_vector(3)),
                                timeout_s=0)
        assert (await client.search(vector=_vector(1), top_k=5, timeout_s=1e20)).hits  # no deadline, not none
        assert [h.image_id for h in (await client.search(vector=_vector(3), top_k=5)).hits] == ["ok"]
        for ids, says in ((["  "], "only spaces"), (b"ok", "got bytes")):
            with pytest.raises(InvalidArgumentError, match=says):
                await client.delete(ids)
    for settings, says in (({"token": b"secret"}, "token must be a string"), ({"max_message_bytes": 0}, "1.."),
                           ({"root_certificates": "ca.pem"}, "read the file first"),
                           ({"certificate_chain": b"x"}, "private key"), ({"timeout_s": None}, "timeout_s")):
        with pytest.raises(InvalidArgumentError, match=says):
            BrokerClient(broker, **settings)
        with pytest.raises(InvalidArgumentError, match=says):
            SyncBrokerClient(broker, **settings)
    with pytest.raises(InvalidArgumentError, match="address"):
        SyncBrokerClient(None)


async def test_a_caller_cancelled_as_its_client_closes_stays_cancelled(hung_broker):
    """close() cancels the searches in flight and turns that into UNAVAILABLE; a search whose owner cancelled it
    in the same turn took UNAVAILABLE too, and a retry on it kept running after its cancel (review of 2026-12-06)."""
    for cancel_first in (True, False):
        client = BrokerClient(hung_broker, timeout_s=math.inf)
        search = asyncio.ensure_future(client.search(vector=_vector(0)))
        await asyncio.sleep(0.5)
        if cancel_first:
            search.cancel()
            await client.close()
        else:
            closing = asyncio.ensure_future(client.close())
            search.cancel()
            await closing
        await asyncio.wait([search], timeout=3)
        assert search.cancelled(), (cancel_first, search.done() and search.exception())


def _shard_map_file(tmp_path):
    path = tmp_path / "shard-map.json"
    path.write_text('{"shards": {"s0": ["127.0.0.1:1"]}}')
    return path


def test_a_broker_token_from_the_environment_is_stripped_as_the_clients_is(monkeypatch, tmp_path):
    from broker.config import BrokerConfig as Config

    shard_map = _shard_map_file(tmp_path)
    monkeypatch.setenv("IMGSEARCH_WRITE_TOKEN", "secret\n")
    config = Config.from_env(["--shard-map", str(shard_map)])
    assert config.write_token == "secret"


async def test_closing_a_client_twice_at_once_gives_its_searches_unavailable(hung_broker):
    """Two close() in one turn (an `async with` exit and a shutdown hook) cancelled a search in flight twice, and
    one uncancel left it cancelled: its caller got CancelledError though nobody cancelled it (review)."""
    client = BrokerClient(hung_broker, timeout_s=math.inf)
    search = asyncio.ensure_future(client.search(vector=_vector(0)))
    await asyncio.sleep(0.5)
    await asyncio.gather(client.close(), client.close())
    await asyncio.wait([search], timeout=3)
    assert not search.cancelled() and isinstance(search.exception(), UnavailableError)


@pytest.mark.parametrize(("variable", "file_text", "says"), [
    ("tök", None, "printable ASCII"), ("real-token", "  \n", "holds no token")])
def test_a_broker_refuses_a_write_token_no_client_could_send(monkeypatch, tmp_path, capsys, variable, file_text,
                                                               says):
    from broker.config import BrokerConfig as Config

    shard_map = _shard_map_file(tmp_path)
    monkeypatch.setenv("IMGSEARCH_WRITE_TOKEN", variable)
    argv = ["--shard-map", str(shard_map)]
    if file_text is not None:
        (tmp_path / "token").write_text(file_text)
        argv += ["--write-token-file", str(tmp_path / "token")]
    with pytest.raises(SystemExit):
        Config.from_env(argv)
    assert says in capsys.readouterr().err
