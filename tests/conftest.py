"""Shared fixtures: free loopback ports, a real redis-server process, the grocery data paths."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _data_dir() -> Path:
    return Path(os.environ.get("IMGSEARCH_DATA_DIR") or ROOT.parent / "shared" / "data")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The read-only shared data folder (../shared/data from the repository root; IMGSEARCH_DATA_DIR)."""
    path = _data_dir()
    assert (path / "grocery" / "train.txt").exists(), f"grocery data missing under {path}"
    return path


@pytest.fixture(scope="session")
def grocery_dir(data_dir) -> Path:
    return data_dir / "grocery"


@pytest.fixture
def free_port():
    """A function returning a loopback port that was free a moment ago."""
    from broker.stack import free_port as pick

    return pick


class RedisProcess:
    """A real redis-server on a free loopback port, with no persistence, in a temporary folder."""

    def __init__(self, work_dir: Path):
        from broker.stack import free_port

        self.work_dir = work_dir
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        import redis

        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [
                shutil.which("redis-server") or "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.work_dir),
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis.from_url(self.url, socket_timeout=1)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.RedisError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    self.stop()
                    raise RuntimeError("redis-server did not start")
                time.sleep(0.05)
        client.close()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    """A redis-server process for the module; `.url`, `.stop()`, `.start()` (same port)."""
    server = RedisProcess(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


async def settle(condition, *, timeout_s: float = 2.0, interval_s: float = 0.02) -> None:
    """Wait until `condition()` holds or `timeout_s` passes (the caller asserts it): for state that a server or
    client reaches shortly after the call under test returns."""
    import asyncio
    import time

    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        await asyncio.sleep(interval_s)
