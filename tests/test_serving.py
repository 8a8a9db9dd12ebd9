"""imgsearch.serving: run_event_loop, the event-loop setting of both services' configs, the loop lag monitor, the
status a call past its deadline is counted under."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import subprocess
import sys
import time

import grpc
import pytest
import uvloop
from grpc_health.v1 import health_pb2
from prometheus_client import REGISTRY

from broker.config import BrokerConfig
from imgsearch import ports
from imgsearch.grpc_core import IOMGR_EXPERIMENTS
from imgsearch.serving import (
    EVENT_LOOPS,
    EventLoopLagMonitor,
    ServerOptions,
    run_event_loop,
    run_until_signalled,
    start_grpc_service,
)

SHARD_MAP = json.dumps({"shards": {"s0": ["127.0.0.1:1"]}, "categories": {"shoes": "s0"}})


async def _loop_type() -> type:
    await asyncio.sleep(0)
    return type(asyncio.get_running_loop())


def test_services_run_on_asyncio_by_default_and_on_uvloop_when_told():
    assert not issubclass(run_event_loop(_loop_type()), uvloop.Loop)
    assert issubclass(run_event_loop(_loop_type(), event_loop="uvloop"), uvloop.Loop)
    assert ServerOptions().event_loop == "asyncio"


def test_an_unknown_event_loop_is_refused_without_leaking_the_coroutine():
    coroutine = _loop_type()
    with pytest.raises(ValueError, match="unknown event loop 'trio'"):
        run_event_loop(coroutine, event_loop="trio")
    assert coroutine.cr_frame is None  # closed, so no "never awaited" warning
    with pytest.raises(ValueError, match="unknown event loop"):
        ServerOptions(event_loop="trio")


def test_broker_event_loop_from_flag_and_environment(monkeypatch):
    monkeypatch.delenv("IMGSEARCH_EVENT_LOOP", raising=False)
    assert BrokerConfig.from_env(["--shard-map", SHARD_MAP]).server.event_loop == "asyncio"
    monkeypatch.setenv("IMGSEARCH_EVENT_LOOP", "uvloop")
    assert BrokerConfig.from_env(["--shard-map", SHARD_MAP]).server.event_loop == "uvloop"
    assert BrokerConfig.from_env(["--shard-map", SHARD_MAP, "--event-loop", "asyncio"]).server.event_loop == "asyncio"
    with pytest.raises(SystemExit):
        BrokerConfig.from_env(["--shard-map", SHARD_MAP, "--event-loop", "trio"])
    assert set(EVENT_LOOPS) == {"asyncio", "uvloop"}


def _hold_the_loop(seconds: float) -> None:
    time.sleep(seconds)  # blocking call on the event loop: what the lag monitor is for


def test_lag_monitor_logs_where_a_stalled_loop_is_stuck_and_times_the_lag(caplog):
    async def main() -> None:
        # The stack is taken once the no-op has waited stall_log_s: at 0.1 s a loop thread descheduled that long
        # on a loaded box was caught entering _hold_the_loop (the "def" line, where it gives up the GIL), not in
        # its sleep. Well inside the hold now.
        monitor = EventLoopLagMonitor(asyncio.get_running_loop(), interval_s=0.02, stall_log_s=0.3)
        monitor.start()
        await asyncio.sleep(0.1)  # a few prompt rounds
        _hold_the_loop(1.0)
        await asyncio.sleep(0.1)
        monitor.stop()
        # On a busy box the watchdog may not have recorded the stalled round yet (a clean-clone run failed so).
        await asyncio.to_thread(monitor.join, 5.0)

    before = REGISTRY.get_sample_value("imgsearch_event_loop_lag_seconds_count") or 0.0
    slow_before = before - (REGISTRY.get_sample_value("imgsearch_event_loop_lag_seconds_bucket", {"le": "0.25"}) or 0.0)
    with caplog.at_level(logging.WARNING, logger="imgsearch.serving"):
        asyncio.run(main())
    stalls = [r.getMessage() for r in caplog.records if "event loop stalled" in r.getMessage()]
    assert len(stalls) == 1 and "_hold_the_loop" in stalls[0] and "time.sleep(seconds)" in stalls[0]
    after = REGISTRY.get_sample_value("imgsearch_event_loop_lag_seconds_count")
    slow_after = after - REGISTRY.get_sample_value("imgsearch_event_loop_lag_seconds_bucket", {"le": "0.25"})
    assert after - before >= 3  # prompt rounds were timed too
    assert slow_after - slow_before == 1  # the stall, once, in a bucket above 0.25 s


# Records GRPC_EXPERIMENTS at the moment grpc is first imported, which is when grpc's core reads it.
_GRPC_IMPORT_SPY = """
import builtins, os, sys
seen = []
real_import = builtins.__import__
def spy(name, *args, **kwargs):
    if name.split(".")[0] == "grpc" and not seen:
        seen.append(os.environ.get("GRPC_EXPERIMENTS"))
    return real_import(name, *args, **kwargs)
builtins.__import__ = spy
import {module}
print(repr(seen[0]))
"""


@pytest.mark.parametrize("module", ["broker.server", "shard_server.server", "broker.client"])
@pytest.mark.parametrize(("preset", "expected"), [(None, IOMGR_EXPERIMENTS), ("", ""), ("-foo", "-foo")])
def test_services_choose_iomgr_before_grpc_is_imported_unless_told_otherwise(module, preset, expected):
    env = {k: v for k, v in os.environ.items() if k != "GRPC_EXPERIMENTS"}
    if preset is not None:
        env["GRPC_EXPERIMENTS"] = preset
    run = subprocess.run([sys.executable, "-c", _GRPC_IMPORT_SPY.format(module=module)], env=env,
                         capture_output=True, text=True, timeout=60, check=True)
    assert run.stdout.strip() == repr(expected)


def test_free_ports_lie_below_the_ephemeral_range_are_free_and_never_repeat():
    low, _ = ports.ephemeral_range()
    picked = [ports.free_port() for _ in range(200)]
    assert len(set(picked)) == len(picked)
    if low - 10_000 >= 1000:  # room below the kernel's range: outgoing connections cannot take these
        assert all(10_000 <= p < low for p in picked)
    with socket.socket() as s:
        s.bind(("127.0.0.1", picked[-1]))


def test_free_port_falls_back_to_the_kernels_pick_without_room_below_the_range(tmp_path, monkeypatch):
    range_file = tmp_path / "ip_local_port_range"
    range_file.write_text("1024\t65535\n")
    monkeypatch.setattr(ports, "_EPHEMERAL_RANGE_FILE", range_file)
    assert ports.ephemeral_range() == (1024, 65535)
    picked = [ports.free_port() for _ in range(20)]
    assert len(set(picked)) == len(picked)


async def test_a_call_past_its_deadline_is_counted_as_deadline_exceeded_not_cancelled():
    """grpc cancels a handler when the client's deadline passes; the client sees DEADLINE_EXCEEDED and the
    server's grpc_server_handled_total must say the same (operators alert on it), not CANCELLED."""
    service_name = "probe.Deadline"

    async def slow(request, context):
        await asyncio.sleep(30)
        return b""

    def register(server):
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(service_name, {
            "Slow": grpc.unary_unary_rpc_method_handler(slow, request_deserializer=bytes, response_serializer=bytes),
        })])
        return [service_name]

    def handled(code: str) -> float:
        labels = {"grpc_type": "unary", "grpc_service": service_name, "grpc_method": "Slow", "grpc_code": code}
        return REGISTRY.get_sample_value("grpc_server_handled_total", labels) or 0.0

    service = await start_grpc_service(ServerOptions(loop_lag_interval_s=0), register, component="probe")
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as channel:
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await channel.unary_unary(f"/{service_name}/Slow")(b"x", timeout=0.2)
            assert raised.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        deadline = time.monotonic() + 5
        while not handled("DEADLINE_EXCEEDED") and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert handled("DEADLINE_EXCEEDED") == 1 and handled("CANCELLED") == 0
    finally:
        await service.stop(grace_s=0)


async def test_a_long_error_message_is_cut_so_the_caller_still_gets_its_status():
    """A status message travels in the trailers, percent-encoded, and grpc drops trailers over 16 KiB: an
    INVALID_ARGUMENT quoting a 20,000-character id reached the caller as RESOURCE_EXHAUSTED "received metadata size
    exceeds hard limit" (API probe of 2026-12-05). Every handler's error message is cut to 1,000 characters."""
    from imgsearch.errors import InvalidArgumentError

    service_name = "probe.LongError"

    async def refuse(request, context):
        # an emoji is 4 bytes in UTF-8, 12 percent-encoded: cut by characters (1,000), 12 KB of trailers still
        # passed grpc's 8 KiB soft limit and failed some calls (review)
        raise InvalidArgumentError("bad id " + "\U0001f600" * 20_000)

    def register(server):
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(service_name, {
            "Refuse": grpc.unary_unary_rpc_method_handler(refuse, request_deserializer=bytes,
                                                          response_serializer=bytes),
        })])
        return [service_name]

    service = await start_grpc_service(ServerOptions(loop_lag_interval_s=0), register, component="probe")
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as channel:
            for _ in range(20):  # the soft limit fails calls at random
                with pytest.raises(grpc.aio.AioRpcError) as raised:
                    await channel.unary_unary(f"/{service_name}/Refuse")(b"x", timeout=5)
                assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT, raised.value.details()[:200]
                assert raised.value.details().startswith("bad id \U0001f600")
                assert "(20,007 characters in all)" in raised.value.details()
            # the health service's own refusal quoted the whole name (it bypasses the interceptor)
            check = channel.unary_unary("/grpc.health.v1.Health/Check",
                                        request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
                                        response_deserializer=health_pb2.HealthCheckResponse.FromString)
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await check(health_pb2.HealthCheckRequest(service="x" * 20_000), timeout=5)
            assert raised.value.code() is grpc.StatusCode.NOT_FOUND
    finally:
        await service.stop(grace_s=0)


async def test_an_open_health_watch_does_not_hold_a_graceful_stop_for_the_whole_grace():
    """A load balancer or the broker may hold a health Watch stream open; the stream never ends by itself, so
    without help grpc waits the full grace period (180 s for a shard pod) for it. The watcher must see
    NOT_SERVING and then its stream ends, and the stop must take only as long as the real in-flight calls."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    def register(server):
        return []

    service = await start_grpc_service(ServerOptions(loop_lag_interval_s=0, shutdown_grace_s=20),
                                       register, component="probe")
    await service.set_serving(True)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
        first = await watch.read()
        assert first.status == health_pb2.HealthCheckResponse.SERVING
        started = time.monotonic()
        await asyncio.wait_for(service.stop(), timeout=15)
        assert time.monotonic() - started < 5
        seen = []
        while (update := await watch.read()) is not grpc.aio.EOF:
            seen.append(update.status)
        assert seen and seen[-1] == health_pb2.HealthCheckResponse.NOT_SERVING
        assert await watch.code() is grpc.StatusCode.OK


async def test_a_stopped_service_closes_its_metrics_port():
    """stop() left the /metrics HTTP server and its thread running: the port kept answering, and a service started
    again in the same process on the same metrics port failed with "address already in use" (review of
    2026-12-05)."""
    import threading

    metrics_port = ports.free_port()

    def register(server):
        return []

    def serving_threads() -> int:
        return sum("serve_forever" in thread.name for thread in threading.enumerate())

    threads_before = serving_threads()
    for _ in range(2):  # the second start binds the same metrics port again
        service = await start_grpc_service(ServerOptions(loop_lag_interval_s=0, metrics_port=metrics_port),
                                           register, component="probe")
        assert service.metrics_port == metrics_port
        with socket.create_connection(("127.0.0.1", metrics_port), timeout=2):
            pass
        await service.stop(grace_s=0)
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", metrics_port), timeout=2).close()
    assert serving_threads() == threads_before


async def test_metrics_stay_up_through_the_process_clean_up_after_a_stop():
    """/metrics closed with the gRPC server, before a shard's final snapshot (minutes at scale): Prometheus saw
    the target down (up == 0) for that long, and a routine drain could page ImgsearchShardDown (deploy review
    of 2026-12-05). It now closes once `on_stop` is done."""
    import urllib.request

    metrics_port = ports.free_port()
    service = await start_grpc_service(ServerOptions(loop_lag_interval_s=0, metrics_port=metrics_port),
                                       lambda server: [], component="probe")
    scraped_during_clean_up = []

    async def clean_up():
        body = await asyncio.to_thread(
            lambda: urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=2).read())
        scraped_during_clean_up.append(b"imgsearch_build_info" in body)

    service.request_stop("test")
    await asyncio.wait_for(run_until_signalled(service, on_stop=clean_up), timeout=30)
    assert scraped_during_clean_up == [True]
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", metrics_port), timeout=2).close()
