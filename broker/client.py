"""Python clients of the broker (async and sync) over the generated stubs: plain data types in and out,
a timeout on every call, and typed errors (imgsearch.errors, via from_rpc_error) instead of grpc.RpcError.

    async with BrokerClient("127.0.0.1:7100") as client:
        answer = await client.search(image=open("photo.jpg", "rb").read(), top_k=5, categories=["Milk"])

    with SyncBrokerClient("127.0.0.1:7100", token="...") as client:
        client.ingest(CatalogueItem(image_id="sku-1", product_id="sku", category="Milk", image=data))
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import numbers
import operator
import time
from collections.abc import AsyncIterable, Iterable, Sequence

import grpc

from broker import convert
from broker.types import CatalogueItem, IngestSummary, Query, SearchAnswer, ShardSummary
from imgsearch.errors import (
    DeadlineExceededError,
    InvalidArgumentError,
    UnavailableError,
    from_rpc_error,
    from_status,
)
from imgsearch.request_streams import StreamPool
from imgsearch.serving import client_channel_options, tls_credentials
from imgsearch.v1 import broker_pb2, broker_pb2_grpc
from shard_server.convert import float32_array, image_id_list
from shard_server.types import Exactness, Filter

_MAX_INT32 = 2**31 - 1


def _search_request(arguments: dict) -> broker_pb2.SearchRequest:
    """The request of a `search` call, built from that call's arguments (`locals()`, before anything else), so
    the sync and async clients keep one list of search options: their signatures. Bad arguments are
    InvalidArgumentError before anything is sent: protobuf's own errors (a ValueError "Value out of range", a
    TypeError, a KeyError) said nothing of the argument, and a message holds only one of image, vector and image
    id, so a second was silently dropped (review of 2026-12-05)."""
    fields = {name: value for name, value in arguments.items() if name not in ("self", "timeout_s")}
    for name, lowest in (("top_k", 1), ("nprobe", 0)):
        value = fields[name]
        if not isinstance(value, bool):
            with contextlib.suppress(TypeError):
                value = fields[name] = operator.index(value)  # numpy integers too
        if not isinstance(value, int) or isinstance(value, bool) or not lowest <= value <= _MAX_INT32:
            # What the message can carry; the broker holds top_k to its own limit (1..1000 by default), so the
            # int32 bound is not named as if it were the range (`-k 0` said "from 1 to 2147483647": docs review)
            raise InvalidArgumentError(f"{name} must be a whole number of at least {lowest}, got {value!r}"
                                       if not isinstance(value, int) or isinstance(value, bool) or value < lowest
                                       else f"{name} must be at most {_MAX_INT32}, got {value!r}")
    given = [name for name in ("image", "vector", "image_id") if fields[name] is not None]
    if len(given) > 1:
        raise InvalidArgumentError(f"a search takes one of image, vector and image_id, got {' and '.join(given)}")
    if fields["image"] is not None and not isinstance(fields["image"], (bytes, bytearray, memoryview)):
        raise InvalidArgumentError(f"image must be the encoded file's bytes, got {type(fields['image']).__name__}"
                                   " (read the file first)")
    if fields["image"] is not None:
        fields["image"] = bytes(fields["image"])  # protobuf takes bytes only
    if fields["image_id"] is not None and not isinstance(fields["image_id"], str):
        raise InvalidArgumentError(f"image_id must be a string, got {type(fields['image_id']).__name__}")
    if not isinstance(fields["exactness"], Exactness):
        raise InvalidArgumentError(f"exactness must be an Exactness, got {fields['exactness']!r}")
    vector, categories, filter = fields.pop("vector"), fields.pop("categories"), fields.pop("filter")
    if filter is not None and not isinstance(filter, Filter):
        raise InvalidArgumentError(f"filter must be a Filter, got {type(filter).__name__}")
    # One name is one category (iterated, a string was read as one category per letter)
    try:
        categories = (categories,) if isinstance(categories, (str, bytes)) else tuple(categories or ())
    except TypeError:  # categories=5
        raise InvalidArgumentError(f"categories must be category names (strings), got {categories!r}") from None
    if not all(isinstance(c, str) for c in categories):
        raise InvalidArgumentError(f"categories must be category names (strings), got {list(categories)!r}")
    if vector is not None:
        vector = float32_array(vector)
        if vector.ndim == 2 and vector.shape[0] == 1:  # a model's output for one image
            vector = vector[0]
        if vector.ndim != 1:  # a (2, 256) array was flattened and searched as one 512-d vector
            raise InvalidArgumentError(f"vector must be one-dimensional, got shape {vector.shape}")
    return convert.query_to_proto(Query(vector=vector, categories=categories, filter=filter or Filter(), **fields))


# Timeouts above this are no deadline at all: grpc failed calls of finite timeouts from about 9e9 s on at once with
# DEADLINE_EXCEEDED (API review of 2026-12-06).
_NO_DEADLINE_ABOVE_S = 1e8


def _seconds(value, what: str) -> float:
    """A timeout given in seconds as a real number: a text, None where not allowed, or NaN is InvalidArgumentError
    (they raised TypeError from inside the client, or a DEADLINE_EXCEEDED that said nothing of why)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value):
        raise InvalidArgumentError(f"{what} must be a number of seconds, got {value!r}")
    value = float(value)
    return math.inf if value > _NO_DEADLINE_ABOVE_S else value


def _or(timeout_s: float | None, default_s: float) -> float:
    """The call's timeout: `default_s` only when none is given (0 meant the default before). A timeout of 0 or
    below is DEADLINE_EXCEEDED before anything is sent: sent, a search came back as an empty partial answer, and
    an ingest was stored (API review of 2026-12-06)."""
    timeout_s = default_s if timeout_s is None else _seconds(timeout_s, "timeout_s")
    if timeout_s <= 0:
        raise DeadlineExceededError(f"no time for the call (timeout_s {timeout_s})")
    return timeout_s


def _grpc_timeout(timeout_s: float) -> float | None:
    """A grpc call's timeout: grpc fails a call with an infinite one at once (API probe of 2026-12-05), so none.
    (A stream message's limit takes infinity as it is.)"""
    return None if timeout_s == float("inf") else timeout_s


def _call_timeout(timeout_s: float | None, default_s: float) -> float | None:
    return _grpc_timeout(_or(timeout_s, default_s))


class _Items:
    """The items of an ingest stream as messages, keeping the error the items themselves raised (an unreadable
    file, say): grpc turned it into UNKNOWN "Exception iterating requests!" (sync) or a CancelledError (async),
    and the caller never learnt which file or why (CLI review of 2026-12-05). The caller gets it back as it was."""

    def __init__(self, items):
        self.items = [items] if isinstance(items, CatalogueItem) else items  # one item is one item
        if not (hasattr(self.items, "__iter__") or hasattr(self.items, "__aiter__")) or \
                isinstance(self.items, (str, bytes, dict)):
            raise InvalidArgumentError(f"items must be CatalogueItems (one, or an iterable of them), got "
                                       f"{type(items).__name__}")
        self.error: BaseException | None = None

    def __iter__(self):
        try:
            for item in self.items:
                yield broker_pb2.IngestStreamRequest(item=convert.checked_item_to_proto(item))
        except Exception as exc:
            self.error = exc
            raise

    async def __aiter__(self):
        if not hasattr(self.items, "__aiter__"):
            for message in iter(self):  # __iter__ keeps the error
                yield message
            return
        try:
            async for item in self.items:
                yield broker_pb2.IngestStreamRequest(item=convert.checked_item_to_proto(item))
        except Exception as exc:
            self.error = exc
            raise


def _delete_ids(image_ids) -> list[str]:
    """The ids of a delete: bytes are refused by name (iterated, they were numbers), and so are ids of only
    spaces, as ingest refuses them (API review of 2026-12-06)."""
    if isinstance(image_ids, (bytes, bytearray, memoryview)):
        raise InvalidArgumentError("image ids must be strings, got bytes (decode them first)")
    ids = image_id_list(image_ids)
    if any(not i.strip() for i in ids):
        raise InvalidArgumentError("an image id is empty or only spaces")
    return ids


def _metadata(token: str | None):
    """The write token's metadata. Its surrounding spaces are dropped (a token read from a file ends in a newline:
    every write failed INTERNAL "Invalid metadata"), and anything but ASCII text is refused (bytes were sent as
    "b'...'", API review of 2026-12-06)."""
    if token is None:
        return None
    if not isinstance(token, str):
        raise InvalidArgumentError(f"token must be a string, got {type(token).__name__}")
    token = token.strip()
    if not token:
        return None
    if not token.isascii() or not token.isprintable():
        raise InvalidArgumentError("token must be printable ASCII (a bearer token)")
    return (("authorization", f"Bearer {token}"),)


def _checked_settings(address, timeout_s, ingest_timeout_s, max_message_bytes) -> tuple[float, float]:
    """A client's settings, or InvalidArgumentError: they raised AttributeError or OverflowError from grpc, or were
    taken and failed every call later (API review of 2026-12-06)."""
    if not isinstance(address, str) or not address:
        raise InvalidArgumentError(f"address must be a non-empty string such as '127.0.0.1:7100', got {address!r}")
    if isinstance(max_message_bytes, bool) or not isinstance(max_message_bytes, int) or \
            not 0 < max_message_bytes <= _MAX_INT32:
        raise InvalidArgumentError(f"max_message_bytes must be a whole number in 1..{_MAX_INT32}, got "
                                   f"{max_message_bytes!r}")
    timeouts = []
    for name, value in (("timeout_s", timeout_s), ("ingest_timeout_s", ingest_timeout_s)):
        value = _seconds(value, name)
        if value <= 0:
            raise InvalidArgumentError(f"{name} must be above 0, got {value}")
        timeouts.append(value)
    return timeouts[0], timeouts[1]


def _credentials(root_certificates, certificate_chain, private_key):
    for name, value in (("root_certificates", root_certificates), ("certificate_chain", certificate_chain),
                        ("private_key", private_key)):
        if value is not None and not isinstance(value, bytes):
            raise InvalidArgumentError(f"{name} must be the PEM file's bytes (read the file first), got "
                                       f"{type(value).__name__}")
    try:
        return tls_credentials(root_certificates, certificate_chain, private_key)
    except ValueError as exc:
        raise InvalidArgumentError(str(exc)) from None


class BrokerClient:
    """Async client (grpc.aio). Searches go over long-lived SearchStream calls (`search_streams`), one search in
    flight per stream and as many streams as searches at once: a message on an open stream costs a third of a
    unary call in gRPC Python. A broker without SearchStream gets unary Search calls."""

    def __init__(
        self,
        address: str,
        *,
        token: str | None = None,
        root_certificates: bytes | None = None,
        certificate_chain: bytes | None = None,
        private_key: bytes | None = None,
        timeout_s: float = 5.0,
        ingest_timeout_s: float = 120.0,
        max_message_bytes: int = 64 * 1024 * 1024,
        search_streams: bool = True,
    ):
        self.timeout_s, self.ingest_timeout_s = _checked_settings(address, timeout_s, ingest_timeout_s,
                                                                  max_message_bytes)
        self._metadata = _metadata(token)
        options = client_channel_options(max_message_bytes)
        credentials = _credentials(root_certificates, certificate_chain, private_key)
        if credentials is not None:
            self._channel = grpc.aio.secure_channel(address, credentials, options=options)
        else:
            self._channel = grpc.aio.insecure_channel(address, options=options)
        self._stub = broker_pb2_grpc.BrokerServiceStub(self._channel)
        self._search_streams = StreamPool(self._stub.SearchStream, peer=f"broker {address}",
                                          max_message_bytes=max_message_bytes, enabled=search_streams)
        self._address = address
        self._closed = False

    async def __aenter__(self) -> BrokerClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    def _check_open(self) -> None:
        if self._closed:  # grpc's own error was a raw UsageError "Channel is closed" (API review of 2026-12-06)
            raise UnavailableError(f"the client of broker {self._address} is closed")

    async def close(self) -> None:
        self._closed = True
        self._search_streams.close()
        await self._channel.close()

    async def search(
        self,
        *,
        image: bytes | None = None,
        vector: Sequence[float] | None = None,
        image_id: str | None = None,
        top_k: int = 10,
        categories: Sequence[str] = (),
        filter: Filter | None = None,
        exactness: Exactness = Exactness.DEFAULT,
        nprobe: int = 0,
        use_duplicate_cache: bool = True,
        distinct_products: bool = False,
        timeout_s: float | None = None,
    ) -> SearchAnswer:
        req = _search_request(locals())
        self._check_open()
        timeout_s = _or(timeout_s, self.timeout_s)
        if self._search_streams.usable():
            deadline = time.monotonic() + timeout_s
            response = await self._search_streams.ask(broker_pb2.SearchStreamRequest(search=req),
                                                      timeout_s=timeout_s)
            if response is not None:
                if response.WhichOneof("outcome") == "error":
                    raise from_status(response.error.code, response.error.message)
                return convert.answer_from_proto(response.result)
            timeout_s = max(0.0, deadline - time.monotonic())  # after a try of the stream (UNIMPLEMENTED)
        try:
            resp = await self._stub.Search(req, timeout=_grpc_timeout(timeout_s))
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None
        return convert.answer_from_proto(resp)

    async def ingest(self, item: CatalogueItem, *, timeout_s: float | None = None) -> IngestSummary:
        req = broker_pb2.IngestRequest(item=convert.checked_item_to_proto(item))
        self._check_open()
        try:
            resp = await self._stub.Ingest(
                req, timeout=_call_timeout(timeout_s, self.ingest_timeout_s), metadata=self._metadata
            )
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None
        return IngestSummary(ingested=resp.ingested, cache_pending=resp.cache_pending)

    async def ingest_stream(
        self, items: Iterable[CatalogueItem] | AsyncIterable[CatalogueItem], *, timeout_s: float | None = None
    ) -> IngestSummary:
        messages = _Items(items)
        self._check_open()
        try:
            resp = await self._stub.IngestStream(
                messages.__aiter__(), timeout=_call_timeout(timeout_s, self.ingest_timeout_s), metadata=self._metadata
            )
        except (grpc.RpcError, asyncio.CancelledError) as err:
            if messages.error is not None:
                raise messages.error from None
            if isinstance(err, asyncio.CancelledError):
                raise
            raise from_rpc_error(err) from None
        return IngestSummary(ingested=resp.ingested, cache_pending=resp.cache_pending)

    async def delete(self, image_ids: Sequence[str] | str, *, timeout_s: float | None = None) -> int:
        req = broker_pb2.BrokerServiceDeleteRequest(image_ids=_delete_ids(image_ids))
        self._check_open()
        try:
            resp = await self._stub.Delete(req, timeout=_call_timeout(timeout_s, self.ingest_timeout_s), metadata=self._metadata)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None
        return resp.deleted

    async def stats(self, *, timeout_s: float | None = None) -> list[ShardSummary]:
        self._check_open()
        try:
            resp = await self._stub.Stats(
                broker_pb2.BrokerServiceStatsRequest(), timeout=_call_timeout(timeout_s, self.timeout_s)
            )
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None
        return convert.stats_from_proto(resp)


class SyncBrokerClient:
    """Blocking client (plain grpc channel), same methods as :class:`BrokerClient`."""

    def __init__(
        self,
        address: str,
        *,
        token: str | None = None,
        root_certificates: bytes | None = None,
        certificate_chain: bytes | None = None,
        private_key: bytes | None = None,
        timeout_s: float = 5.0,
        ingest_timeout_s: float = 120.0,
        max_message_bytes: int = 64 * 1024 * 1024,
    ):
        self.timeout_s, self.ingest_timeout_s = _checked_settings(address, timeout_s, ingest_timeout_s,
                                                                  max_message_bytes)
        self._metadata = _metadata(token)
        options = client_channel_options(max_message_bytes)
        credentials = _credentials(root_certificates, certificate_chain, private_key)
        if credentials is not None:
            self._channel = grpc.secure_channel(address, credentials, options=options)
        else:
            self._channel = grpc.insecure_channel(address, options=options)
        self._stub = broker_pb2_grpc.BrokerServiceStub(self._channel)
        self._address = address
        self._closed = False

    def __enter__(self) -> SyncBrokerClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:  # grpc raised a raw ValueError, and a health check on the closed channel crashed the
            # process (a segmentation fault: API review of 2026-12-06)
            raise UnavailableError(f"the client of broker {self._address} is closed")

    def close(self) -> None:
        self._closed = True
        self._channel.close()

    def search(
        self,
        *,
        image: bytes | None = None,
        vector: Sequence[float] | None = None,
        image_id: str | None = None,
        top_k: int = 10,
        categories: Sequence[str] = (),
        filter: Filter | None = None,
        exactness: Exactness = Exactness.DEFAULT,
        nprobe: int = 0,
        use_duplicate_cache: bool = True,
        distinct_products: bool = False,
        timeout_s: float | None = None,
    ) -> SearchAnswer:
        req = _search_request(locals())
        self._check_open()
        try:
            return convert.answer_from_proto(self._stub.Search(req, timeout=_call_timeout(timeout_s, self.timeout_s)))
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None

    def ingest(self, item: CatalogueItem, *, timeout_s: float | None = None) -> IngestSummary:
        req = broker_pb2.IngestRequest(item=convert.checked_item_to_proto(item))
        self._check_open()
        try:
            resp = self._stub.Ingest(req, timeout=_call_timeout(timeout_s, self.ingest_timeout_s), metadata=self._metadata)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None
        return IngestSummary(ingested=resp.ingested, cache_pending=resp.cache_pending)

    def ingest_stream(
        self, items: Iterable[CatalogueItem], *, timeout_s: float | None = None
    ) -> IngestSummary:
        messages = _Items(items)
        self._check_open()
        try:
            resp = self._stub.IngestStream(
                iter(messages), timeout=_call_timeout(timeout_s, self.ingest_timeout_s), metadata=self._metadata
            )
        except grpc.RpcError as err:
            if messages.error is not None:
                raise messages.error from None
            raise from_rpc_error(err) from None
        return IngestSummary(ingested=resp.ingested, cache_pending=resp.cache_pending)

    def delete(self, image_ids: Sequence[str] | str, *, timeout_s: float | None = None) -> int:
        req = broker_pb2.BrokerServiceDeleteRequest(image_ids=_delete_ids(image_ids))
        self._check_open()
        try:
            return self._stub.Delete(
                req, timeout=_call_timeout(timeout_s, self.ingest_timeout_s), metadata=self._metadata
            ).deleted
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None

    def stats(self, *, timeout_s: float | None = None) -> list[ShardSummary]:
        self._check_open()
        try:
            resp = self._stub.Stats(
                broker_pb2.BrokerServiceStatsRequest(), timeout=_call_timeout(timeout_s, self.timeout_s)
            )
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None
        return convert.stats_from_proto(resp)

    def wait_until_serving(self, *, timeout_s: float = 60.0) -> None:
        """Block until the broker's health check says SERVING (raises UnavailableError after timeout_s)."""
        import time

        from grpc_health.v1 import health_pb2, health_pb2_grpc

        self._check_open()
        timeout_s = _seconds(timeout_s, "timeout_s")
        stub = health_pb2_grpc.HealthStub(self._channel)
        deadline = time.monotonic() + timeout_s
        last = "no answer"
        while time.monotonic() < deadline:
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
                last = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
            except grpc.RpcError as err:
                last = err.code().name
            time.sleep(0.2)
        raise UnavailableError(f"broker not serving after {timeout_s:.0f}s ({last})")
