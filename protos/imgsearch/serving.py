"""gRPC server plumbing shared by the broker and the shard servers.

Every service gets the same things here: standard gRPC server metrics (the names of go-grpc-prometheus, which
dashboards expect), the mapping of :class:`imgsearch.errors.ImgsearchError` to status codes, health and
reflection services, optional TLS, message size limits, a Prometheus ``/metrics`` endpoint and graceful shutdown
on SIGTERM/SIGINT.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import inspect
import logging
import math
import signal
import sys
import threading
import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import Counter, Gauge, Histogram, start_http_server

from imgsearch.errors import ImgsearchError, MalformedRequestError, TooManyStreamsError
from imgsearch.gc_pauses import install_gc_pause_metric

log = logging.getLogger(__name__)

# Millisecond-resolution buckets, dense around the 5-50 ms search objectives.
LATENCY_BUCKETS_S = (
    0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075,
    0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0,
)

GRPC_STARTED = Counter(
    "grpc_server_started_total", "RPCs started on the server.", ["grpc_type", "grpc_service", "grpc_method"]
)
GRPC_HANDLED = Counter(
    "grpc_server_handled_total",
    "RPCs completed on the server, regardless of success or failure.",
    ["grpc_type", "grpc_service", "grpc_method", "grpc_code"],
)
GRPC_HANDLING_SECONDS = Histogram(
    "grpc_server_handling_seconds",
    "Response latency of RPCs handled by the server.",
    ["grpc_type", "grpc_service", "grpc_method"],
    buckets=LATENCY_BUCKETS_S,
)
BUILD_INFO = Gauge("imgsearch_build_info", "Build information; always 1.", ["component", "version"])
EVENT_LOOP_LAG_SECONDS = Histogram(
    "imgsearch_event_loop_lag_seconds",
    "How late the event loop ran a callback scheduled from a watchdog thread: time every RPC of the process "
    "waited behind other work on the loop.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)

# A health "service" that is SERVING for as long as the process runs: Kubernetes liveness probes ask for it,
# so a broker whose dependencies are down turns unready (readiness: service "") without being restarted.
LIVENESS_SERVICE = "imgsearch.liveness"

# The event loop a service runs on: asyncio's own by default, uvloop on request (the imgsearch[uvloop] extra).
# Measured on the 2-core box: a bare echo hop is ~9 % cheaper on uvloop (`python -m shard_server.hop_floor
# --event-loop asyncio|uvloop`, 8 alternating pairs, 1 client p50 1.04 -> 0.95 ms), but the full stack is
# slower on it (`IMGSEARCH_EVENT_LOOP=asyncio|uvloop IMGSEARCH_SHARD_EVENT_LOOP=... python -m broker.loadtest`,
# two pairs in both orders: 8 clients 55-56 searches/s on asyncio vs 38-40 on uvloop, the broker's embed and
# fan-out stages both slower), so the default stays asyncio. Re-measure on other hardware before switching.
EVENT_LOOPS = ("asyncio", "uvloop")
DEFAULT_EVENT_LOOP = EVENT_LOOPS[0]

T = TypeVar("T")


def check_event_loop(event_loop: str) -> str:
    """`event_loop` if it is one of EVENT_LOOPS, else ValueError (the configs check theirs with this)."""
    if event_loop not in EVENT_LOOPS:
        raise ValueError(f"unknown event loop {event_loop!r}: expected one of {', '.join(EVENT_LOOPS)}")
    return event_loop


def run_event_loop(main: Coroutine[Any, Any, T], *, event_loop: str = DEFAULT_EVENT_LOOP) -> T:
    """Run a service's main coroutine to completion on the chosen event loop (see EVENT_LOOPS)."""
    try:
        check_event_loop(event_loop)
    except ValueError:
        main.close()
        raise
    if event_loop == "uvloop":
        try:
            import uvloop  # optional: the imgsearch[uvloop] extra
        except ImportError as exc:
            main.close()
            raise RuntimeError("event loop 'uvloop' needs the uvloop package: "
                               "pip install 'imgsearch[uvloop]'") from exc
        return uvloop.run(main)
    return asyncio.run(main)


def _rpc_type(method) -> str:
    if method.client_streaming and method.server_streaming:
        return "bidi_stream"
    if method.client_streaming:
        return "client_stream"
    if method.server_streaming:
        return "server_stream"
    return "unary"


# Status codes whose series exist from the start for every method, besides OK: rate() and increase() see a
# series' first increment only against an earlier sample, so the first failure of a code with no series yet
# was invisible to the error-ratio and load-shedding alerts. Bounded: these codes x the services' methods.
PREINITIALISED_CODES = ("OK", "UNKNOWN", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "INTERNAL", "UNAVAILABLE")


def preinitialise_rpc_metrics(service_names: Iterable[str]) -> None:
    """Create the series of every method up front (handled: for each of PREINITIALISED_CODES), so that rate() sees
    the first calls after a restart."""
    from google.protobuf import descriptor_pool

    pool = descriptor_pool.Default()
    for name in service_names:
        try:
            service = pool.FindServiceByName(name)
        except KeyError:
            continue
        for method in service.methods:
            labels = (_rpc_type(method), name, method.name)
            GRPC_STARTED.labels(*labels)
            GRPC_HANDLING_SECONDS.labels(*labels)
            for code in PREINITIALISED_CODES:
                GRPC_HANDLED.labels(*labels, code)


def _split_method(full_method: str) -> tuple[str, str]:
    # "/imgsearch.v1.ShardService/Search" -> ("imgsearch.v1.ShardService", "Search")
    _, service, method = full_method.split("/", 2)
    return service, method


# A status message travels in the call's trailers, each UTF-8 byte outside printable ASCII percent-encoded as three,
# and grpc fails calls whose trailers pass 8 KiB (some of them) or 16 KiB (all): the caller then got
# RESOURCE_EXHAUSTED "received metadata size exceeds ... limit" instead of the status, for an INVALID_ARGUMENT that
# quoted a 20,000-character id (API probe of 2026-12-05). 2,000 UTF-8 bytes are at most 6,000 encoded.
MAX_STATUS_DETAILS_BYTES = 2000


def status_details(exc: BaseException | str) -> str:
    """An error's message for a status, cut to MAX_STATUS_DETAILS_BYTES of UTF-8."""
    details = exc if isinstance(exc, str) else (str(exc) or exc.code.name)
    encoded = details.encode("utf-8", errors="replace")
    if len(encoded) > MAX_STATUS_DETAILS_BYTES:
        cut = encoded[:MAX_STATUS_DETAILS_BYTES].decode("utf-8", errors="ignore")
        details = f"{cut}... ({len(details):,} characters in all)"
    return details


async def _finish(context: grpc.aio.ServicerContext, exc: BaseException | None) -> grpc.StatusCode:
    """Map an exception raised by a handler to a status, aborting the call when needed."""
    if exc is None:
        code = context.code() if hasattr(context, "code") else None
        return code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.OK
    if isinstance(exc, TooManyStreamsError):
        await context.abort(exc.code, status_details(exc),
                            trailing_metadata=((TooManyStreamsError.metadata_key, "1"),))
    if isinstance(exc, ImgsearchError):
        await context.abort(exc.code, status_details(exc))
    if isinstance(exc, asyncio.CancelledError):
        raise exc
    if isinstance(exc, NotImplementedError) and _code_of(context, None) == "UNIMPLEMENTED":
        # a generated servicer's default for a method it does not serve (it sets the code, then raises)
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "method not implemented")
    log.exception("unhandled error in RPC handler", exc_info=exc)
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}")
    return grpc.StatusCode.INTERNAL  # pragma: no cover - abort raises


_STATUS_NAMES = {c.value[0]: c.name for c in grpc.StatusCode}  # grpc.aio reports the code as an int


def _code_of(context: grpc.aio.ServicerContext, exc: BaseException | None) -> str:
    if isinstance(exc, ImgsearchError):
        return exc.code.name
    code = context.code() if hasattr(context, "code") else None
    if isinstance(code, grpc.StatusCode):
        return code.name
    if isinstance(code, int) and code in _STATUS_NAMES:
        return _STATUS_NAMES[code]
    if exc is None:
        return "OK"
    if isinstance(exc, asyncio.CancelledError):
        # grpc cancels the handler both when the client cancels and when the call's deadline passes; the client
        # sees DEADLINE_EXCEEDED in the second case, and so should the server's metrics.
        remaining = context.time_remaining() if hasattr(context, "time_remaining") else None
        return "DEADLINE_EXCEEDED" if remaining is not None and remaining <= 0 else "CANCELLED"
    return "INTERNAL" if not isinstance(exc, grpc.aio.AbortError) else "UNKNOWN"


@dataclass(frozen=True)
class MalformedRequest:
    """Stands in for a request message that could not be parsed, so the handler wrapper can answer
    INVALID_ARGUMENT: an exception raised by the deserializer itself reaches the client as UNKNOWN."""

    reason: str

    def error(self) -> MalformedRequestError:
        return MalformedRequestError(f"malformed request message: {self.reason}")


def _lenient(deserialize: Callable[[bytes], object] | None) -> Callable[[bytes], object] | None:
    if deserialize is None:
        return None

    def parse(data: bytes) -> object:
        try:
            return deserialize(data)
        except DecodeError as exc:
            return MalformedRequest(str(exc) or "not a protobuf message")

    return parse


async def _checked_stream(messages: AsyncIterator) -> AsyncIterator:
    async for message in messages:
        if isinstance(message, MalformedRequest):
            raise message.error()
        yield message


class ServerInterceptor(grpc.aio.ServerInterceptor):
    """Counts and times every RPC and turns ImgsearchError into its status code."""

    def __init__(self) -> None:
        # Wrapped handlers by method name (a bounded set: unknown methods get no handler), built once per
        # method rather than once per RPC.
        self._wrapped: dict[str, tuple[object, object]] = {}

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        cached = self._wrapped.get(handler_call_details.method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._wrap_handler(handler, handler_call_details.method)
        self._wrapped[handler_call_details.method] = (handler, wrapped)
        return wrapped

    def _wrap_handler(self, handler, full_method: str):
        service, method = _split_method(full_method)
        if service.startswith("grpc."):
            return handler  # health and reflection stay out of the service metrics
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap_unary(handler.unary_unary, "unary", service, method),
                request_deserializer=_lenient(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                self._wrap_unary(handler.stream_unary, "client_stream", service, method),
                request_deserializer=_lenient(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        if handler.stream_stream:
            # Not counted here: a long-lived request stream counts each of its messages (MessageMetrics).
            return grpc.stream_stream_rpc_method_handler(
                self._wrap_bidi(handler.stream_stream, service, method),
                request_deserializer=_lenient(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        return handler

    @staticmethod
    def _wrap_bidi(behaviour: Callable[..., Any], service: str, method: str):
        """Errors to status codes, and a malformed message counted as one INVALID_ARGUMENT call (the stream's
        messages are counted by the handler, MessageMetrics)."""
        labels = ("bidi_stream", service, method)

        async def failed(e: BaseException, context) -> None:
            if isinstance(e, (MalformedRequestError, TooManyStreamsError)):  # counted as one refused call
                GRPC_STARTED.labels(*labels).inc()
                GRPC_HANDLED.labels(*labels, e.code.name).inc()
            if not isinstance(e, grpc.aio.AbortError):
                await _finish(context, e)

        if not inspect.isasyncgenfunction(behaviour):  # a handler that writes with context.write, or none at all
            async def wrapped_coroutine(request_iterator, context):
                try:
                    result = behaviour(_checked_stream(request_iterator), context)
                    if inspect.isawaitable(result):
                        await result
                except (Exception, asyncio.CancelledError) as e:
                    await failed(e, context)
                    raise

            return wrapped_coroutine

        async def wrapped(request_iterator, context):
            # GeneratorExit (the call ended while a response was on its way) passes through: it is no error, and
            # aborting then logged one and left the inner generators suspended.
            responses = behaviour(_checked_stream(request_iterator), context)
            try:
                async with contextlib.aclosing(responses):
                    async for response in responses:
                        yield response
            except (Exception, asyncio.CancelledError) as e:
                await failed(e, context)
                raise

        return wrapped

    @staticmethod
    def _wrap_unary(behaviour: Callable[..., Awaitable], rpc_type: str, service: str, method: str):
        started = GRPC_STARTED.labels(rpc_type, service, method)
        timing = GRPC_HANDLING_SECONDS.labels(rpc_type, service, method)

        async def wrapped(request_or_iterator, context):
            started.inc()
            t0 = time.perf_counter()
            exc: BaseException | None = None
            try:
                if isinstance(request_or_iterator, MalformedRequest):
                    raise request_or_iterator.error()
                if rpc_type == "client_stream":
                    request_or_iterator = _checked_stream(request_or_iterator)
                return await behaviour(request_or_iterator, context)
            except BaseException as e:  # noqa: BLE001 - re-raised or mapped below
                exc = e
                if isinstance(e, grpc.aio.AbortError):
                    raise
                await _finish(context, e)
                raise
            finally:
                timing.observe(time.perf_counter() - t0)
                GRPC_HANDLED.labels(rpc_type, service, method, _code_of(context, exc)).inc()

        return wrapped


class EventLoopLagMonitor:
    """A watchdog thread that measures the event loop's lag and logs where a stalled loop is stuck.

    Every ``interval_s`` it schedules a no-op on the loop and times how long the loop takes to run it
    (``imgsearch_event_loop_lag_seconds``). Every RPC a process serves passes through its one loop, so a long
    lag is a latency spike for every call in flight; when the no-op has not run after ``stall_log_s``, the loop
    thread's Python stack is logged while it is still stuck (unless a C call holds the GIL: the stack is then
    taken when it lets go, and the log says how late).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, *, interval_s: float, stall_log_s: float) -> None:
        self._loop = loop
        self._loop_thread_id = threading.get_ident()  # constructed on the loop's thread
        self._interval_s = interval_s
        self._stall_log_s = stall_log_s
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="event-loop-lag", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()

    def join(self, timeout_s: float) -> None:
        """Wait for the watchdog to finish its last measurement (after ``stop``)."""
        self._thread.join(timeout_s)

    def _watch(self) -> None:
        while not self._stopped.wait(self._interval_s):
            ran: concurrent.futures.Future[None] = concurrent.futures.Future()
            t0 = time.perf_counter()
            try:
                self._loop.call_soon_threadsafe(ran.set_result, None)
            except RuntimeError:  # the loop is closed
                return
            try:
                ran.result(timeout=self._stall_log_s)
            except concurrent.futures.TimeoutError:
                late_s = time.perf_counter() - t0
                frame = sys._current_frames().get(self._loop_thread_id)
                stack = "".join(traceback.format_stack(frame)) if frame is not None else "(no frame)\n"
                log.warning("event loop stalled: a callback has waited %.0f ms; the loop thread is in:\n%s",
                            late_s * 1e3, stack.rstrip())
                while not self._stopped.is_set():
                    with contextlib.suppress(concurrent.futures.TimeoutError):
                        ran.result(timeout=1.0)
                        break
            EVENT_LOOP_LAG_SECONDS.observe(time.perf_counter() - t0)


@dataclass(frozen=True, kw_only=True)
class ServerOptions:
    """Network settings common to every service."""

    host: str = "127.0.0.1"
    port: int = 0
    metrics_port: int | None = None  # None: no /metrics endpoint; 0: any free port
    max_message_bytes: int = 16 * 1024 * 1024
    shutdown_grace_s: float = 10.0
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_client_ca_file: Path | None = None
    # Read by the service's main() before it starts its loop (run_event_loop); one of EVENT_LOOPS.
    event_loop: str = DEFAULT_EVENT_LOOP
    # EventLoopLagMonitor: how often the loop's lag is measured (0: never), and after how long a stalled loop's
    # stack is logged.
    loop_lag_interval_s: float = 0.25
    loop_stall_log_s: float = 0.2
    # Long-lived search streams open at once per method (RequestStreams); a stream over it is refused when it
    # opens (RESOURCE_EXHAUSTED), and our clients send that search as a unary call instead.
    max_search_streams: int = 2048

    def __post_init__(self) -> None:
        check_event_loop(self.event_loop)
        if self.max_search_streams < 1:
            raise ValueError(f"max_search_streams must be at least 1, got {self.max_search_streams}")
        if not 0 < self.max_message_bytes < math.inf:  # 0 or -1 made grpc refuse every message, or none
            raise ValueError(f"max_message_bytes must be a number > 0, got {self.max_message_bytes}")
        for name in ("shutdown_grace_s", "loop_lag_interval_s", "loop_stall_log_s"):
            value = getattr(self, name)
            if not 0 <= value < math.inf:  # a NaN or negative grace reached grpc's stop as it was
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")
        # Half a TLS setting (a mistyped variable) must not quietly serve plaintext, without client auth.
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ValueError("TLS needs both a certificate and its key (--tls-cert-file and --tls-key-file)")
        if self.tls_client_ca_file and not self.tls_cert_file:
            raise ValueError("--tls-client-ca-file (mutual TLS) needs --tls-cert-file and --tls-key-file")


def channel_credentials(ca_file: Path | None = None, cert_file: Path | None = None,
                        key_file: Path | None = None) -> grpc.ChannelCredentials | None:
    """`tls_credentials` from PEM files."""
    def read(path: Path | None) -> bytes | None:
        return path.read_bytes() if path else None

    return tls_credentials(read(ca_file), read(cert_file), read(key_file))


def tls_credentials(root_certificates: bytes | None = None, certificate_chain: bytes | None = None,
                    private_key: bytes | None = None) -> grpc.ChannelCredentials | None:
    """Client TLS credentials: the server's CA (None with a certificate: the system's), and for mutual TLS this
    client's certificate and key; None (a plaintext channel) when nothing is given. Half a client certificate (a
    mistyped variable) is refused rather than sent in plaintext."""
    if (certificate_chain is None) != (private_key is None):
        raise ValueError("a client certificate needs its private key, and a key its certificate")
    if root_certificates is None and certificate_chain is None:
        return None
    return grpc.ssl_channel_credentials(root_certificates, private_key, certificate_chain)


class HealthServicer(health_pb2_grpc.HealthServicer):
    """The grpc.health.v1 service, whose Watch streams end when the server drains.

    grpc's own aio servicer never ends a Watch, so one watcher (a load balancer, a mesh sidecar) held every
    graceful stop for its whole grace period (180 s for a shard pod) while nothing else was in flight. Here each
    watcher gets NOT_SERVING and then the end of its stream, and the stop waits only for real calls.
    """

    def __init__(self) -> None:
        self._status = {"": health_pb2.HealthCheckResponse.SERVING}
        self._changed = asyncio.Condition()
        self._draining = False

    async def Check(self, request: health_pb2.HealthCheckRequest, context) -> health_pb2.HealthCheckResponse:
        status = self._status.get(request.service)
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, status_details(f"unknown service {request.service!r}"))
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(self, request: health_pb2.HealthCheckRequest, context) -> None:
        unknown = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
        sent = None
        while True:
            status = self._status.get(request.service, unknown)
            if status != sent:
                await context.write(health_pb2.HealthCheckResponse(status=status))
                sent = status
            if self._draining:
                return
            async with self._changed:
                # Checked again under the lock: a change made while the write above was awaited is not lost.
                if self._status.get(request.service, unknown) == sent and not self._draining:
                    await self._changed.wait()

    async def set(self, service: str, status: health_pb2.HealthCheckResponse.ServingStatus) -> None:
        if self._draining:
            return  # a drained server never reports SERVING again
        async with self._changed:
            self._status[service] = status
            self._changed.notify_all()

    async def drain(self) -> None:
        """Every service NOT_SERVING for good, and every Watch stream ended."""
        async with self._changed:
            self._draining = True
            for service in self._status:
                self._status[service] = health_pb2.HealthCheckResponse.NOT_SERVING
            self._changed.notify_all()


class MessageMetrics:
    """The call metrics of a request stream whose every message is one request (ShardService.SearchStream):
    grpc_server_started_total, grpc_server_handled_total and grpc_server_handling_seconds count and time each
    message as one call (grpc_type "bidi_stream"), so per-request objectives and alerts see it as they see a unary
    call. The stream itself is not counted (it lives as long as its client)."""

    def __init__(self, service: str, method: str) -> None:
        self._labels = ("bidi_stream", service, method)
        self._started = GRPC_STARTED.labels(*self._labels)
        self._timing = GRPC_HANDLING_SECONDS.labels(*self._labels)
        self._ok = GRPC_HANDLED.labels(*self._labels, "OK")

    def started(self) -> float:
        self._started.inc()
        return time.perf_counter()

    def handled(self, t0: float, error: BaseException | None = None) -> None:
        """One message answered (`error` None), or failed with `error`."""
        self._timing.observe(time.perf_counter() - t0)
        if error is None:
            self._ok.inc()
            return
        if isinstance(error, ImgsearchError):
            code = error.code.name
        elif isinstance(error, asyncio.CancelledError):  # the client gave up on it (its time limit) or hung up
            code = "CANCELLED"
        else:
            code = "INTERNAL"
        GRPC_HANDLED.labels(*self._labels, code).inc()


# A request stream that carried no message for this long is ended (status OK; clients open a new one when they
# next need it). A client that vanished without closing its connection (power loss, a partition, a proxy that
# holds the connection) left its idle streams open for grpc's 2-hour keepalive, each holding one of
# max_search_streams: once they were all held, every new stream was refused (review of 2026-12-06). Well above
# the Python clients' MAX_STREAM_AGE_S (60 s), after which they close an idle stream themselves.
STREAM_IDLE_LIMIT_S = 300.0
# How often the idle streams are looked for (the limit is enforced to within this).
STREAM_IDLE_SWEEP_S = 30.0


class RequestStreams:
    """The open long-lived request streams of a servicer, so that shutting down does not wait for them.

    grpc's graceful stop waits up to its grace period for every open call, and such a stream stays open as long
    as its client: every stop took the whole grace. `end()` (GrpcService.stop calls it before stopping the
    server) ends each stream at once if it is waiting for its next message, or right after the answer it is
    working on; the client opens a new stream (to another replica, or to this one once it is back). A stream that
    waits longer than STREAM_IDLE_LIMIT_S for its next message is ended the same way."""

    def __init__(self, *, max_open: int = ServerOptions.max_search_streams) -> None:
        self._open: dict[asyncio.Task, bool] = {}  # handler task -> answering a message now
        self._last_message: dict[asyncio.Task, float] = {}  # handler task -> event-loop time of its last message
        self._idle_ended: set[asyncio.Task] = set()
        self._sweeper: asyncio.Task | None = None  # runs while streams are open
        self.ending = False
        # Each open stream holds a handler task and grpc's call state for as long as its client keeps it: without
        # a bound, clients (or one faulty client) could open streams until the process ran out of memory.
        self.max_open = max_open

    @property
    def open_streams(self) -> int:
        return len(self._open)

    async def serve(self, request_iterator: AsyncIterator, answer: Callable[[Any], Awaitable[Any]]) -> AsyncIterator:
        """A stream handler's responses: `answer` of each message in turn, until the client ends the stream or
        `end()` is called."""
        if self.ending:
            return
        if len(self._open) >= self.max_open:
            raise TooManyStreamsError(f"{len(self._open)} streams of this method are open, this server's limit "
                                      "(max_search_streams); send the request as a unary call")
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        self._open[task] = False
        self._last_message[task] = loop.time()
        if self._sweeper is None:
            self._sweeper = loop.create_task(self._end_idle_streams())
        try:
            async for message in self._until_ended(request_iterator, task):
                self._open[task] = True
                yield await answer(message)
                if self.ending:
                    return
                self._open[task] = False
                self._last_message[task] = loop.time()
        finally:
            self._open.pop(task, None)
            self._last_message.pop(task, None)
            self._idle_ended.discard(task)

    async def _until_ended(self, request_iterator: AsyncIterator, task: asyncio.Task) -> AsyncIterator:
        # `end()` and the idle sweep cancel the wait for the next message; that must end the stream with a status:
        # grpc.aio sends none for a handler cancelled from inside the server, and its graceful stop then waited
        # for the call.
        try:
            async for message in request_iterator:
                yield message
        except asyncio.CancelledError:
            if not (self.ending or task in self._idle_ended):
                raise  # the client hung up

    async def _end_idle_streams(self) -> None:
        """While streams are open: end those waiting for a message for over STREAM_IDLE_LIMIT_S."""
        loop = asyncio.get_running_loop()
        try:
            while self._open and not self.ending:
                await asyncio.sleep(min(STREAM_IDLE_SWEEP_S, STREAM_IDLE_LIMIT_S))
                now = loop.time()
                for task, busy in list(self._open.items()):
                    if not busy and task not in self._idle_ended and \
                            now - self._last_message.get(task, now) > STREAM_IDLE_LIMIT_S:
                        self._idle_ended.add(task)
                        task.cancel()  # waiting for its next message: it ends with status OK (as in `end()`)
        finally:
            self._sweeper = None

    def end(self) -> None:
        self.ending = True
        if self._sweeper is not None:
            self._sweeper.cancel()
        for task, busy in list(self._open.items()):
            if not busy:
                # Waiting for its next message: the handler catches this cancel and ends the stream with status
                # OK (it must: grpc.aio sends no status for a handler cancelled from inside the server). A busy
                # one returns after its answer (see `ending`).
                task.cancel()


class GrpcService:
    """A running grpc.aio server with health, reflection and metrics; `stop()` is graceful."""

    def __init__(self, server: grpc.aio.Server, port: int, health_servicer: HealthServicer,
                 service_names: list[str], metrics_port: int | None, grace_s: float,
                 lag_monitor: EventLoopLagMonitor | None = None, metrics_server=None, *,
                 max_search_streams: int = ServerOptions.max_search_streams):
        self.server = server
        self.port = port
        self.health = health_servicer
        self.service_names = service_names
        self.metrics_port = metrics_port
        self._grace_s = grace_s
        self._lag_monitor = lag_monitor
        self._metrics_server = metrics_server  # the /metrics HTTP server (closed with the service)
        self.request_streams: list[RequestStreams] = []  # ended before the server stops (see RequestStreams)
        self._max_search_streams = max_search_streams
        self.stop_reason: str | None = None
        self._stop_requested = asyncio.Event()
        self._health_drain: asyncio.Task | None = None

    def serve_request_streams(self, streams: RequestStreams) -> None:
        """Streams of a servicer: bounded by the server's max_search_streams, ended before the server stops."""
        streams.max_open = self._max_search_streams
        self.request_streams.append(streams)

    def request_stop(self, reason: str) -> None:
        """Fail-stop from inside the service: every health status (liveness too) turns NOT_SERVING at once, and
        `run_until_signalled` drains and returns as on SIGTERM. Call it on the event loop's thread."""
        if self.stop_reason is None:
            self.stop_reason = reason
            log.error("stopping: %s", reason)
        self._stop_requested.set()
        if self._health_drain is None:
            self._health_drain = asyncio.ensure_future(self.health.drain())

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ["", *self.service_names]:
            await self.health.set(name, status)

    async def stop(self, grace_s: float | None = None, *, close_metrics: bool = True) -> None:
        """Drain and stop serving; the /metrics endpoint too unless `close_metrics` is False (then
        `close_metrics()` once the process's own clean-up is done)."""
        await self.set_serving(False)
        await self.health.drain()  # liveness too, and open Watch streams end rather than hold the grace
        for streams in self.request_streams:
            streams.end()
        await self.server.stop(self._grace_s if grace_s is None else grace_s)
        if self._lag_monitor is not None:
            self._lag_monitor.stop()
        if close_metrics:
            await self.close_metrics()

    async def close_metrics(self) -> None:
        if self._metrics_server is not None:
            # Its port and thread were left behind: a service started again in the same process on the same
            # metrics port failed with "address already in use" (review of 2026-12-05).
            metrics_server, self._metrics_server = self._metrics_server, None
            await asyncio.to_thread(_close_http_server, metrics_server)

    async def wait(self) -> None:
        await self.server.wait_for_termination()


async def start_grpc_service(
    options: ServerOptions,
    register: Callable[[grpc.aio.Server], Iterable[str]],
    *,
    component: str,
    version: str = "0.1.0",
) -> GrpcService:
    """Build and start a server. `register` adds the servicers and returns their full service names.

    Health starts NOT_SERVING; the caller flips it with ``set_serving(True)`` once it is ready.
    """
    server = grpc.aio.server(
        interceptors=[ServerInterceptor()],
        options=[
            ("grpc.max_receive_message_length", options.max_message_bytes),
            ("grpc.max_send_message_length", options.max_message_bytes),
            ("grpc.so_reuseport", 0),
            # Clients ping every 30 s while a call is open (client_channel_options), and a search stream stays
            # open while idle: with grpc's default (5 min) the server answered GOAWAY "too_many_pings" after
            # about 4 idle minutes, failing every call of the connection (review of 2026-12-05).
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ],
    )
    names = list(register(server))
    preinitialise_rpc_metrics(names)
    health_servicer = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server
    )
    address = f"{options.host}:{options.port}"
    if options.tls_cert_file and options.tls_key_file:
        creds = grpc.ssl_server_credentials(
            [(options.tls_key_file.read_bytes(), options.tls_cert_file.read_bytes())],
            root_certificates=options.tls_client_ca_file.read_bytes() if options.tls_client_ca_file else None,
            require_client_auth=options.tls_client_ca_file is not None,
        )
        port = server.add_secure_port(address, creds)
    else:
        port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"could not bind {address}")
    metrics_port = metrics_server = None
    if options.metrics_port is not None:
        metrics_server = start_metrics_server(options.host, options.metrics_port)
        metrics_port = metrics_server.server_address[1]
    BUILD_INFO.labels(component, version).set(1)
    install_gc_pause_metric()
    await server.start()
    lag_monitor = None
    if options.loop_lag_interval_s > 0:
        lag_monitor = EventLoopLagMonitor(asyncio.get_running_loop(), interval_s=options.loop_lag_interval_s,
                                          stall_log_s=options.loop_stall_log_s)
        lag_monitor.start()
    service = GrpcService(server, port, health_servicer, names, metrics_port, options.shutdown_grace_s,
                          lag_monitor, metrics_server, max_search_streams=options.max_search_streams)
    await service.set_serving(False)
    await health_servicer.set(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.SERVING)
    return service


def start_metrics_endpoint(host: str, port: int) -> int:
    """Serve the default Prometheus registry over HTTP for the rest of the process; returns the bound port."""
    return start_metrics_server(host, port).server_address[1]


def start_metrics_server(host: str, port: int):
    """Serve the default Prometheus registry over HTTP, in a thread; returns the server (`_close_http_server`)."""
    httpd, _thread = start_http_server(port, addr=host)
    return httpd


def _close_http_server(httpd) -> None:
    httpd.shutdown()  # ends serve_forever, and with it the thread
    httpd.server_close()


async def run_until_signalled(service: GrpcService, on_stop: Callable[[], Awaitable[None]] | None = None) -> None:
    """Block until SIGTERM/SIGINT (or `service.request_stop`), then drain: health NOT_SERVING, stop accepting,
    finish in-flight RPCs."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    waiter = asyncio.create_task(service.wait())
    stopper = asyncio.create_task(stop.wait())
    requested = asyncio.create_task(service._stop_requested.wait())
    await asyncio.wait({waiter, stopper, requested}, return_when=asyncio.FIRST_COMPLETED)
    requested.cancel()
    log.info("shutting down (grace %.1fs)", service._grace_s)
    # /metrics stays up through `on_stop` (a shard's final snapshot can take minutes): closed with the gRPC
    # server, the target read as down (up == 0) for that long and could page ImgsearchShardDown on a routine
    # drain (deploy review of 2026-12-05).
    await service.stop(close_metrics=False)
    try:
        if on_stop is not None:
            await on_stop()
    finally:
        await service.close_metrics()
        waiter.cancel()
        stopper.cancel()


def remaining_timeout_s(context: grpc.aio.ServicerContext, default_s: float) -> float:
    """Seconds left before the caller's deadline (``default_s`` when the caller set none)."""
    remaining = context.time_remaining()
    if remaining is None:
        return default_s
    return max(0.0, min(remaining, default_s))


def client_channel_options(max_message_bytes: int = 16 * 1024 * 1024) -> list[tuple[str, object]]:
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.enable_retries", 0),
        # grpc backs off reconnecting to a down server from 1 s by x1.6 up to 120 s: a shard back after an outage
        # of minutes was refused by the broker for up to two more (3.1 s after a 20 s outage in
        # tests/test_write_versions.py). Trying a down address every second costs nothing worth saving.
        ("grpc.initial_reconnect_backoff_ms", 250),
        ("grpc.min_reconnect_backoff_ms", 250),
        ("grpc.max_reconnect_backoff_ms", 1_000),
        # A restarted pod comes back on a new address; grpc resolves the name again when the connection fails,
        # but by default at most every 30 s.
        ("grpc.dns_min_time_between_resolutions_ms", 1_000),
    ]
