"""Run a real ``imgsearch-shard`` process (tests, benchmarks, local demos): start it on a free loopback port,
wait for health SERVING, stop it with SIGTERM or kill it with SIGKILL."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shard_server.convert import SERVICE_NAME

_LISTENING = re.compile(r"shard listening on [^:]+:(\d+) \(metrics (\w+)\)")


def shard_command() -> list[str]:
    script = Path(sys.executable).parent / "imgsearch-shard"
    if script.exists():
        return [str(script)]
    found = shutil.which("imgsearch-shard")
    return [found] if found else [sys.executable, "-m", "shard_server.server"]


class ShardProcess:
    def __init__(self, data_dir: Path, *, log_path: Path | None = None, extra_args: tuple[str, ...] = (),
                 env: dict[str, str] | None = None):
        self.data_dir = data_dir
        self.log_path = log_path or data_dir.parent / f"{data_dir.name}-shard.log"
        self.extra_args = extra_args
        self.env = env
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None
        self.metrics_port: int | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, *, timeout_s: float = 120.0, wait_serving: bool = True) -> ShardProcess:
        args = [*shard_command(), "--data-dir", str(self.data_dir), "--host", "127.0.0.1", "--port", "0",
                *self.extra_args]
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in _reset()
        offset = self._log.tell()
        self.proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(self.env or {})})
        deadline = time.monotonic() + timeout_s
        while self.port is None:
            if self.proc.poll() is not None:
                raise RuntimeError(f"shard exited with {self.proc.returncode}: {self.log_text()[-4000:]}")
            if time.monotonic() > deadline:
                self.kill()
                raise TimeoutError(f"shard did not start listening: {self.log_text()[-4000:]}")
            match = _LISTENING.search(self.log_path.read_bytes()[offset:].decode(errors="replace"))
            if match:
                self.port = int(match.group(1))
                self.metrics_port = int(match.group(2)) if match.group(2).isdigit() else None
            else:
                time.sleep(0.05)
        if wait_serving:
            self.wait_serving(timeout_s=max(1.0, deadline - time.monotonic()))
        return self

    def wait_serving(self, *, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        with grpc.insecure_channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"shard exited with {self.proc.returncode}: {self.log_text()[-4000:]}")
                try:
                    status = stub.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=1.0).status
                    if status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"shard not SERVING after {timeout_s:.0f}s: {self.log_text()[-4000:]}")
                time.sleep(0.1)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill(self) -> None:
        """SIGKILL: no snapshot, no flush, no goodbye."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)
        self._reset()

    def stop(self, *, timeout_s: float = 60.0) -> int | None:
        """SIGTERM (graceful drain + final snapshot); SIGKILL if it does not exit in time."""
        code = None
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                code = self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        elif self.proc is not None:
            code = self.proc.returncode
        self._reset()
        return code

    def _reset(self) -> None:
        self.port = None
        if getattr(self, "_log", None) is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> ShardProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
