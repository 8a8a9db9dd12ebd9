"""imgsearch.serving.run_event_loop and the event-loop setting of both services' configs."""

from __future__ import annotations

import asyncio
import json

import pytest
import uvloop
from imgsearch.serving import EVENT_LOOPS, ServerOptions, run_event_loop

from broker.config import BrokerConfig

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
