"""Run the real Triton Inference Server (the ``tritonserver`` binary shipped in nvidia-pytriton) on this machine.

`start_triton(repo, grpc_port=..., http_port=..., metrics_port=...)` launches it, waits until it and its models
are ready (health over gRPC) and returns a handle that is also a context manager; `.stop()` sends SIGTERM to
the server's process group (Triton drains in-flight requests), then SIGKILL if it lingers.

``imgsearch-embed serve`` writes a model repository to a temporary directory and runs Triton in the foreground
until Ctrl-C / SIGTERM. It speaks Triton's standard gRPC/HTTP protocols with its own /metrics (nv_inference_*),
so the broker's client code is the same as for a GPU Triton.

What the binary needs here (found the hard way):
- numpy < 2 for the python backend (numpy 2 gives empty outputs);
- the python-backend stub built for this interpreter's version, next to libtriton_python.so in a backend
  directory, and the interpreter's libpython directory on LD_LIBRARY_PATH (with a pyenv Python the stub
  otherwise loads a mismatched libpython: "'_thread.RLock' object has no attribute '_recursion_count'");
- the project and the venv's site-packages on PYTHONPATH, so the python models import embedder.preprocess,
  PIL, numpy and onnxruntime;
- a per-server shared-memory prefix for the python backend, so several servers can run side by side.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import site
import subprocess
import sys
import sysconfig
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from embedder.errors import EmbedderUnavailableError
from imgsearch.ports import free_port

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_READY_MODELS = ("imgsearch",)


class TritonStartError(EmbedderUnavailableError):
    """Triton did not start or its models did not become ready."""


def pytriton_dir() -> Path:
    import pytriton

    return Path(pytriton.__file__).resolve().parent


def tritonserver_binary() -> Path:
    return pytriton_dir() / "tritonserver" / "bin" / "tritonserver"


def available_backends() -> set[str]:
    """Backends the shipped tritonserver can load (nvidia-pytriton 0.7 ships only `python`)."""
    backends = pytriton_dir() / "tritonserver" / "backends"
    return {p.name for p in backends.iterdir() if p.is_dir() and not p.name.startswith("__")}


def _libs_dir() -> Path:
    root = pytriton_dir()
    bundled = root.parent / "nvidia_pytriton.libs"  # wheel install (auditwheel)
    return bundled if bundled.is_dir() else root / "tritonserver" / "external_libs"  # editable install


def _prepare_backends(workdir: Path) -> Path:
    """A backend directory holding the python backend with the stub for this interpreter's version."""
    source = pytriton_dir() / "tritonserver"
    python_backend = workdir / "backends" / "python"
    shutil.copytree(source / "backends" / "python", python_backend, ignore=shutil.ignore_patterns("__pycache__"))
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = source / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise TritonStartError(f"nvidia-pytriton ships no python-backend stub for Python {version}")
    shutil.copy2(stub, python_backend / "triton_python_backend_stub")
    return workdir / "backends"


def _join_paths(*parts: str | None) -> str:
    return ":".join(p for p in parts if p)


def triton_environment(base: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    env["LD_LIBRARY_PATH"] = _join_paths(
        str(_libs_dir()), sysconfig.get_config_var("LIBDIR"), env.get("LD_LIBRARY_PATH")
    )
    env["PATH"] = _join_paths(str(Path(sys.executable).parent), env.get("PATH"))
    env["PYTHONPATH"] = _join_paths(str(PROJECT_ROOT), *site.getsitepackages(), env.get("PYTHONPATH"))
    return env


@dataclass(kw_only=True)
class TritonServer:
    """A tritonserver process. Use `start_triton` (or `with TritonServer(...) as server:`)."""

    model_repository: Path
    grpc_port: int = 0  # 0: pick a free port
    http_port: int = 0
    metrics_port: int = 0
    host: str = "127.0.0.1"
    ready_models: Sequence[str] = DEFAULT_READY_MODELS
    startup_timeout_s: float = 180.0
    stop_timeout_s: float = 15.0
    log_verbose: int = 0
    log_to_console: bool = False  # foreground `serve`: Triton's log goes to our stdout
    # Where Triton's log is appended and kept (`imgsearch up`: <work-dir>/logs/triton.log); None: a temporary
    # folder's tritonserver.log, removed by stop().
    log_file: Path | None = None
    extra_args: Sequence[str] = ()
    _process: subprocess.Popen | None = field(default=None, init=False, repr=False)
    _workdir: Path | None = field(default=None, init=False, repr=False)
    # Triton's --id, which its server metadata answers: readiness is asked of this process, not of whatever
    # listens on the port (another Triton there made a start report ready, then exit: review of 2026-12-06).
    server_id: str = field(default_factory=lambda: f"imgsearch-{uuid.uuid4().hex}", init=False)

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics_port}/metrics"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    @property
    def log_path(self) -> Path | None:
        if self.log_to_console:
            return None
        if self.log_file is not None:
            return self.log_file
        return self._workdir / "tritonserver.log" if self._workdir else None

    def log_tail(self, lines: int = 40) -> str:
        path = self.log_path
        if not path or not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def command(self, backend_dir: Path) -> list[str]:
        shm_prefix = f"imgsearch_{os.getpid()}_{uuid.uuid4().hex[:8]}_"
        return [
            str(tritonserver_binary()),
            f"--id={self.server_id}",
            f"--model-repository={self.model_repository}",
            f"--backend-directory={backend_dir}",
            f"--grpc-address={self.host}", f"--grpc-port={self.grpc_port}",
            f"--http-address={self.host}", f"--http-port={self.http_port}",
            "--allow-metrics=true", f"--metrics-address={self.host}", f"--metrics-port={self.metrics_port}",
            "--allow-gpu-metrics=false",
            "--exit-on-error=true",
            "--strict-readiness=true",
            "--exit-timeout-secs=10",
            f"--log-verbose={self.log_verbose}",
            f"--backend-config=python,shm-region-prefix-name={shm_prefix}",
            # One batch of 32 images is 19 MB of pixels: start big enough not to grow per request.
            "--backend-config=python,shm-default-byte-size=33554432",
            "--backend-config=python,shm-growth-byte-size=16777216",
            *self.extra_args,
        ]

    def start(self) -> TritonServer:
        if self.is_running():
            return self
        if int(np.__version__.split(".")[0]) >= 2:
            raise TritonStartError(f"Triton's python backend needs numpy<2, this venv has {np.__version__}")
        binary = tritonserver_binary()
        if not binary.is_file():
            raise TritonStartError(f"tritonserver not found at {binary} (pip install nvidia-pytriton)")
        requested = (self.grpc_port, self.http_port, self.metrics_port)
        attempts = 3 if not any(requested) else 1  # retry only when every port was ours to pick
        for attempt in range(attempts):
            try:
                return self._start_once()
            except TritonStartError as exc:
                # A port picked free a moment ago can be taken by a parallel process before Triton binds it.
                if attempt + 1 == attempts or "already in use" not in str(exc):
                    raise
                self.grpc_port, self.http_port, self.metrics_port = requested
        raise AssertionError("unreachable")

    def _start_once(self) -> TritonServer:
        self.grpc_port = self.grpc_port or free_port(self.host)
        self.http_port = self.http_port or free_port(self.host)
        self.metrics_port = self.metrics_port or free_port(self.host)
        self._workdir = Path(tempfile.mkdtemp(prefix="imgsearch-triton-"))
        backend_dir = _prepare_backends(self._workdir)
        log = None if self.log_to_console else open(self.log_path, "ab" if self.log_file else "wb")  # noqa: SIM115
        try:
            self._process = subprocess.Popen(
                self.command(backend_dir), env=triton_environment(), stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT if log else None,
                start_new_session=True,  # its own process group: stop() also reaches the python-backend stubs
            )
        finally:
            if log:
                log.close()
        try:
            self.wait_ready(timeout_s=self.startup_timeout_s)
        except TritonStartError as exc:
            tail = self.log_tail()
            self.stop()
            raise TritonStartError(f"{exc}\n--- tritonserver log ---\n{tail}" if tail else str(exc)) from None
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self, *, timeout_s: float) -> None:
        import tritonclient.grpc as grpcclient

        deadline = time.monotonic() + timeout_s
        client = grpcclient.InferenceServerClient(self.grpc_url)
        try:
            while True:
                if not self.is_running():
                    raise TritonStartError(f"tritonserver exited with code {self._process.returncode}")
                with contextlib.suppress(Exception):
                    if client.is_server_ready(client_timeout=2.0) and all(
                        client.is_model_ready(name, client_timeout=2.0) for name in self.ready_models
                    ):
                        answering = client.get_server_metadata(client_timeout=2.0).name
                        if answering == self.server_id:
                            return
                        # Another server holds the port; ours exits with "already in use" (the retry in start()).
                if time.monotonic() > deadline:
                    raise TritonStartError(f"tritonserver not ready after {timeout_s:.0f}s")
                time.sleep(0.25)
        finally:
            client.close()

    def stop(self) -> None:
        """SIGTERM to the server's process group, SIGKILL after stop_timeout_s; removes the work directory."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)
        if process is not None:
            # Stubs of a killed server may outlive it in the group.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def start_triton(
    model_repository: str | Path,
    *,
    grpc_port: int = 0,
    http_port: int = 0,
    metrics_port: int = 0,
    host: str = "127.0.0.1",
    ready_models: Sequence[str] = DEFAULT_READY_MODELS,
    startup_timeout_s: float = 180.0,
    log_to_console: bool = False,
    log_file: Path | None = None,
) -> TritonServer:
    """Start Triton on `model_repository` and wait until `ready_models` are ready (ports 0: free ports)."""
    server = TritonServer(
        model_repository=Path(model_repository), grpc_port=grpc_port, http_port=http_port,
        metrics_port=metrics_port, host=host, ready_models=tuple(ready_models),
        startup_timeout_s=startup_timeout_s, log_to_console=log_to_console, log_file=log_file,
    )
    return server.start()


@dataclass(frozen=True, kw_only=True)
class ServeConfig:
    model_path: Path | None = None
    host: str = "127.0.0.1"
    grpc_port: int = 8001
    http_port: int = 8000
    metrics_port: int = 8002
    max_batch_size: int = 32
    embedding_instances: int = 1
    # Decoding runs in the preprocessing model's instances, one process and one core each (2.4-5 ms a photo).
    preprocess_instances: int = 1

    @classmethod
    def from_env(cls, argv: Sequence[str] | None = None) -> ServeConfig:
        env = os.environ
        parser = argparse.ArgumentParser(
            prog="imgsearch-embed serve", description="Run a Triton Inference Server hosting the embedding model."
        )
        parser.add_argument("--model", type=Path, default=env.get("IMGSEARCH_MODEL"),
                            help="ONNX file (default: $IMGSEARCH_MODEL, else the shipped model)")
        parser.add_argument("--host", default=env.get("IMGSEARCH_TRITON_HOST", cls.host),
                            help="address to listen on (0.0.0.0 in a container)")
        parser.add_argument("--grpc-port", type=int, default=int(env.get("IMGSEARCH_TRITON_GRPC_PORT", cls.grpc_port)))
        parser.add_argument("--http-port", type=int, default=int(env.get("IMGSEARCH_TRITON_HTTP_PORT", cls.http_port)))
        parser.add_argument("--metrics-port", type=int,
                            default=int(env.get("IMGSEARCH_TRITON_METRICS_PORT", cls.metrics_port)))
        parser.add_argument("--max-batch-size", type=int, default=cls.max_batch_size)
        parser.add_argument("--instances", type=int, default=cls.embedding_instances,
                            help="embedding model instances")
        parser.add_argument("--preprocess-instances", type=int, default=cls.preprocess_instances,
                            help="decoding instances (processes), about one per core the server may use")
        args = parser.parse_args(argv)
        if args.instances < 1 or args.preprocess_instances < 1 or args.max_batch_size < 1:
            # a batch size of 0 started a server that refused every call ("Expected [1], got [1,1]": review)
            parser.error("--instances, --preprocess-instances and --max-batch-size must be at least 1")
        return cls(model_path=args.model, host=args.host, grpc_port=args.grpc_port, http_port=args.http_port,
                   metrics_port=args.metrics_port, max_batch_size=args.max_batch_size,
                   embedding_instances=args.instances, preprocess_instances=args.preprocess_instances)


def main(argv: Sequence[str] | None = None) -> int:
    from embedder.triton_repo import RepositoryOptions, write_model_repository

    config = ServeConfig.from_env(argv)
    backend = "onnxruntime" if "onnxruntime" in available_backends() else "python"
    stop_requested = False

    def request_stop(signum: int, _frame: object) -> None:
        nonlocal stop_requested
        stop_requested = True

    with tempfile.TemporaryDirectory(prefix="imgsearch-triton-repo-") as repo:
        try:
            write_model_repository(
                repo, model_path=config.model_path, embedding_backend=backend,
                options=RepositoryOptions(max_batch_size=config.max_batch_size,
                                          embedding_instances=config.embedding_instances,
                                          preprocess_instances=config.preprocess_instances),
            )
        except (FileNotFoundError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        signal.signal(signal.SIGTERM, request_stop)
        signal.signal(signal.SIGINT, request_stop)
        try:
            server = start_triton(repo, grpc_port=config.grpc_port, http_port=config.http_port,
                                  metrics_port=config.metrics_port, host=config.host, log_to_console=True)
        except TritonStartError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        with server:
            print(f"Triton ready: gRPC {server.grpc_url}, HTTP {server.http_url}, metrics {server.metrics_url} "
                  f"(embedding backend: {backend}); Ctrl-C to stop", flush=True)
            while not stop_requested and server.is_running():
                time.sleep(0.5)
            exited = not server.is_running()
    if exited and not stop_requested:
        print("tritonserver exited unexpectedly", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
