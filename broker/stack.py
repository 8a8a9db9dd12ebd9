"""A whole imgsearch stack on this machine, as real processes on loopback ports: redis-server (or REDIS_URL),
Triton on CPU with the default model, N `imgsearch-shard` processes and the broker. Used by `imgsearch up`,
`imgsearch demo` and the end-to-end tests.

Each process writes its log to ``<work_dir>/logs/<name>.log``; `stop()` terminates everything in reverse
order (SIGTERM, then SIGKILL after a grace period).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import redis

from broker.routing import ShardMap, ShardMapError
from imgsearch.ports import free_port

log = logging.getLogger(__name__)

HOST = "127.0.0.1"


def console_script(name: str) -> list[str]:
    """The command of one of our console scripts, from this interpreter's venv when installed there."""
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return [str(candidate)]
    found = shutil.which(name)
    if found:
        return [found]
    module = {
        "imgsearch-shard": "shard_server.server",
        "imgsearch-broker": "broker.server",
        "imgsearch": "broker.cli",
    }[name]
    return [sys.executable, "-c", f"import sys; from {module} import main; sys.exit(main())"]


def check_port_free(host: str, port: int, what: str) -> None:
    """Raise OSError when `port` cannot be bound on `host` (another process listens there)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise OSError(f"the {what} {host}:{port} is in use ({exc.strerror}): another stack or service "
                          "listens there; pick another port") from None


def wait_for_port(
    host: str, port: int, *, timeout_s: float, process: subprocess.Popen | None = None, name: str = "",
    stop_requested: Callable[[], bool] | None = None, log_path: Path | None = None,
) -> None:
    """Return once something listens on `port`; raise RuntimeError when `process` exits first (with the last line
    of its `log_path`, which says why), TimeoutError after `timeout_s`, InterruptedError as soon as
    `stop_requested()` is true."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if stop_requested is not None and stop_requested():
            raise InterruptedError(f"stopped while waiting for {name} on {host}:{port}")
        if process is not None and process.poll() is not None:
            why = log_tail(log_path, 1)[:500] if log_path is not None else ""
            raise RuntimeError(f"{name} exited with code {process.returncode} before listening on {port}"
                               + (f": {why}" if why else ""))
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return
        time.sleep(0.1)
    raise TimeoutError(f"{name} not listening on {host}:{port} after {timeout_s:.0f}s")


def log_tail(path: Path, lines: int = 30) -> str:
    """The last `lines` non-empty lines of a log ("" when it cannot be read). Its last line is a process's reason
    to exit: "data dir ... is in use by another process" was only in the shard's log, and `up` said no more than
    its exit code (review)."""
    try:
        kept = [line.rstrip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return "\n".join(kept[-lines:])


@dataclass
class ManagedProcess:
    name: str
    process: subprocess.Popen
    log_path: Path

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    def stop(self, grace_s: float = 10.0, sig: int = signal.SIGTERM) -> None:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(grace_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)

    def kill(self) -> None:
        self.stop(grace_s=5.0, sig=signal.SIGKILL)

    def log_tail(self, lines: int = 30) -> str:
        return log_tail(self.log_path, lines)


# In a work dir: the layout and model its catalogue was stored with (LocalStack.check_layout).
LAYOUT_FILE = "stack.json"
# Held (flock) by the stack that runs in a work dir, from before its layout check until it has stopped.
LOCK_FILE = "stack.lock"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _holds_data(shard_dir: Path) -> bool:
    """Whether a shard's data folder holds anything: a snapshot, or a write in its log."""
    if any((shard_dir / "snapshots").glob("snap-*")):
        return True
    return any(f.stat().st_size > 0 for f in (shard_dir / "wal").glob("*.wal*") if f.is_file())


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@dataclass(frozen=True, kw_only=True)
class StackConfig:
    work_dir: Path
    shards: int = 2
    # Shard processes per shard, holding the same data (the broker writes to all, searches any).
    replicas: int = 1
    broker_port: int = 0  # 0: a free port
    broker_metrics_port: int = 0
    # None: start an own redis-server in work_dir; otherwise use this Redis.
    redis_url: str | None = None
    model_path: Path | None = None
    # Pinned categories (category -> shard index); the rest follow the default hash rule.
    pinned_categories: dict[str, int] = field(default_factory=dict)
    write_token: str | None = None
    search_timeout_s: float = 5.0
    redis_timeout_s: float = 0.2
    ingest_concurrency: int = 4
    startup_timeout_s: float = 180.0
    shard_args: tuple[str, ...] = ()


class LocalStack:
    def __init__(self, config: StackConfig):
        self.config = config
        # absolute: the children run in it, and the paths given to them must not be read from there again
        self.work_dir = config.work_dir.resolve()
        self.logs = self.work_dir / "logs"
        self.processes: dict[str, ManagedProcess] = {}
        self.triton = None
        self.redis_url: str | None = config.redis_url
        self.redis_port: int | None = None
        self.triton_url = ""
        self.triton_metrics_url = ""
        self.shard_addresses: list[str] = []  # the first replica of each shard
        self.shard_ports: dict[str, tuple[int, int]] = {}  # process name -> (port, metrics port)
        self.shard_metrics_ports: list[int] = []
        self.broker_address = ""
        self.broker_metrics_port = 0
        self.shard_map: ShardMap | None = None
        self._lock: int | None = None  # the descriptor holding LOCK_FILE

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> LocalStack:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        if self.config.shards < 1 or self.config.replicas < 1:
            raise ValueError("a stack needs at least one shard and one replica")
        # Before anything starts: a broker port already in use made the new broker exit while the health check
        # reached the other stack's broker, and "ready" was printed for it (CLI review of 2026-12-05).
        for port, what in ((self.config.broker_port, "broker port"), (self.config.broker_metrics_port,
                                                                        "broker metrics port")):
            if port:
                check_port_free(HOST, port, what)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self._take_work_dir()
        try:
            self.logs.mkdir(exist_ok=True)
            self.check_layout()
        except BaseException:
            self._release_work_dir()
            raise
        try:
            if self.redis_url is None:
                self.start_redis()
            self.start_triton()
            self.start_shards()
            self.start_broker()
            self.wait_until_serving()
            self.record_layout()
        except BaseException:
            self.stop()
            raise

    def _take_work_dir(self) -> None:
        """One stack per work dir. A second `imgsearch up` on the work dir of a running stack that held no data
        yet deleted that stack's Triton repository (check_layout starts a fresh work dir's anew) before its own
        shards were refused the data dirs (review of 2026-12-05)."""
        fd = os.open(self.work_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip()
            os.close(fd)
            raise OSError(f"{self.work_dir} is in use by another stack (`imgsearch up`, pid {holder or 'unknown'});"
                          " stop it first, or use another --work-dir") from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock = fd

    def _release_work_dir(self) -> None:
        if self._lock is not None:
            fd, self._lock = self._lock, None
            os.close(fd)  # releases the flock

    def check_layout(self) -> None:
        """Refuse to start a work dir's catalogue under another layout or model (a review of 2026-12-06): with
        more replicas the new ones started empty and searches alternated between hits and none; with other shards
        or pinned categories, categories would be looked for on shards that do not hold them; and a new model's
        embeddings do not compare with the stored ones (the work dir's Triton repository also kept the old model,
        so IMGSEARCH_MODEL was silently ignored). Whether the work dir holds a catalogue is told by its shards'
        data (a snapshot, or a write in their logs), not by the files a start writes: a start that failed or was
        interrupted holds nothing, and any layout and model may follow it (its Triton repository is written
        again). The layout is that of `stack.json` (written once a start serves, `record_layout`), else of the
        shard map the last start wrote (a work dir of an older version), else of the shards' data folders; the
        model is the copy its Triton repository serves."""
        model = self._model()
        if not self._holds_data():
            shutil.rmtree(self.work_dir / "triton-repo", ignore_errors=True)
            (self.work_dir / LAYOUT_FILE).unlink(missing_ok=True)
            return
        recorded = self._recorded_layout()
        wanted = self._layout(model)
        if "shards_at_least" in recorded:
            # Its shards hold data, but no file says how it was laid out: a larger layout would route categories to
            # shards that do not hold them (a review: 2 of 3 categories lost), so the user says it.
            raise ValueError(
                f"{self.work_dir} holds a catalogue, but its {LAYOUT_FILE} and shard-map.json are missing or "
                f"unreadable; its shards' data shows at least {recorded['shards_at_least']} shard(s) x "
                f"{recorded['replicas_at_least']} replica(s), which is only a lower bound. Write the layout it was "
                f'started with to {self.work_dir / LAYOUT_FILE} ({{"shards": S, "replicas": R, '
                '"pinned_categories": {category: shard index}}) and start it with the same flags: any other '
                "layout, smaller or larger, routes categories to shards that do not hold them")
        changed = [f"{key} {recorded[key]!r} -> {wanted[key]!r}" for key in ("shards", "replicas", "pinned_categories")
                   if key in recorded and recorded[key] != wanted[key]]
        least_shards, least_replicas = self._data_bound()
        if not changed and (wanted["shards"] < least_shards or wanted["replicas"] < least_replicas):
            # a layout written by hand, smaller than the shards that hold data (a review)
            raise ValueError(
                f"{self.work_dir}: shards' data exists for at least {least_shards} shard(s) x {least_replicas} "
                f"replica(s), more than {wanted['shards']} x {wanted['replicas']}; start it with the layout it was "
                f"started with (and correct {LAYOUT_FILE} if it was written by hand)")
        if changed:
            raise ValueError(
                f"{self.work_dir} holds a catalogue stored as {recorded['shards']} shard(s) x {recorded['replicas']} "
                f"replica(s) (pinned categories {recorded.get('pinned_categories', 'unknown') or 'none'}); this start "
                f"changes {', '.join(changed)}. Start it as it was, or use a new --work-dir and ingest again")
        served = self.work_dir / "triton-repo" / "imgsearch_embedding" / "1" / "model.onnx"
        stored_by = _sha256(served) if served.is_file() else recorded.get("model_sha256")
        if stored_by is not None and stored_by != wanted["model_sha256"]:
            raise ValueError(
                f"{self.work_dir} holds a catalogue embedded by another model than {model}: its vectors do not "
                "compare with this model's. Use a new --work-dir and ingest again (or start it with the model it "
                "was started with)")

    def _holds_data(self) -> bool:
        """Whether a shard of the work dir has stored anything."""
        return any(_holds_data(shard) for shard in self.work_dir.glob("shard-*"))

    def record_layout(self) -> None:
        """Write the layout and model this start serves (`check_layout`), atomically."""
        _write_atomically(self.work_dir / LAYOUT_FILE, json.dumps(self._layout(self._model()), indent=1) + "\n")

    def _model(self) -> Path:
        from embedder.model_files import default_model_path

        model = self.config.model_path or default_model_path()
        if not model.is_file():
            raise ValueError(f"ONNX model not found: {model}")
        return model

    def _layout(self, model: Path) -> dict:
        return {"shards": self.config.shards, "replicas": self.config.replicas,
                "pinned_categories": dict(sorted(self.config.pinned_categories.items())),
                "model_sha256": _sha256(model)}

    def _recorded_layout(self) -> dict:
        """The layout of LAYOUT_FILE, else of the shard map the last start wrote, else the least one the shards'
        data folders (`shard-<i>`, `shard-<i>-r<j>`) show."""
        with contextlib.suppress(OSError, ValueError):
            recorded = json.loads((self.work_dir / LAYOUT_FILE).read_text())
            if isinstance(recorded, dict) and {"shards", "replicas", "pinned_categories"} <= recorded.keys():
                return recorded
        with contextlib.suppress(OSError, ShardMapError, ValueError, KeyError, TypeError, AttributeError):
            shard_map = ShardMap.load(self.work_dir / "shard-map.json")
            replicas = {len(addresses) for addresses in shard_map.shards.values()}
            return {"shards": len(shard_map.shards),
                    "replicas": replicas.pop() if len(replicas) == 1 else sorted(replicas),
                    "pinned_categories": dict(sorted((category, int(shard.rpartition("-")[2]))
                                                     for category, shard in shard_map.categories.items()))}
        shards, replicas = self._data_bound()
        return {"shards_at_least": shards, "replicas_at_least": replicas}

    def _data_bound(self) -> tuple[int, int]:
        """The least (shards, replicas) the shards' folders that hold data show (a shard that owns no category
        yet holds nothing, so only a lower bound)."""
        shards, replicas = 0, 0
        for folder in self.work_dir.glob("shard-*"):
            found = re.fullmatch(r"shard-(\d+)(?:-r(\d+))?", folder.name)
            if found and _holds_data(folder):
                shards, replicas = max(shards, int(found[1]) + 1), max(replicas, int(found[2] or 0) + 1)
        return shards, replicas

    def stop(self) -> None:
        """The broker, the shards, Triton, then Redis: nothing is stopped while something started after it still
        runs."""
        try:
            for name in reversed(list(self.processes)):
                if name != "redis":
                    self.processes[name].stop()
            self.stop_triton()
            self.stop_redis()
        finally:
            self._release_work_dir()

    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> ManagedProcess:
        log_path = self.logs / f"{name}.log"
        with open(log_path, "ab") as out:  # the child has its own copy of the descriptor
            process = subprocess.Popen(
                argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **(env or {})},
                cwd=self.work_dir,
            )
        managed = ManagedProcess(name=name, process=process, log_path=log_path)
        self.processes[name] = managed
        return managed

    # ------------------------------------------------------------------ redis
    def start_redis(self) -> None:
        port = self.redis_port or free_port()
        data = self.work_dir / "redis"
        data.mkdir(exist_ok=True)
        proc = self._spawn(
            "redis",
            [
                shutil.which("redis-server") or "redis-server",
                "--port",
                str(port),
                "--bind",
                HOST,
                "--dir",
                str(data),
                "--save",
                "",
                "--appendonly",
                "no",
                "--protected-mode",
                "yes",
            ],
        )
        wait_for_port(HOST, port, timeout_s=20, process=proc.process, name="redis-server")
        self.redis_port = port
        self.redis_url = f"redis://{HOST}:{port}/0"
        client = redis.Redis.from_url(self.redis_url, socket_timeout=2)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.RedisError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        client.close()

    def stop_redis(self) -> None:
        if "redis" in self.processes:
            self.processes["redis"].stop()

    # ------------------------------------------------------------------ triton
    def start_triton(self) -> None:
        from embedder.triton_repo import write_model_repository
        from embedder.triton_server import available_backends, start_triton

        repo = self.work_dir / "triton-repo"
        if not repo.exists():
            # The tritonserver shipped in nvidia-pytriton has only the python backend: the ONNX model then
            # runs through ONNX Runtime inside a python-backend model (same tensors, same batching).
            backend = "onnxruntime" if "onnxruntime" in available_backends() else "python"
            write_model_repository(
                repo, model_path=self.config.model_path, instance_kind="KIND_CPU", embedding_backend=backend
            )
        self.triton = start_triton(
            repo, startup_timeout_s=self.config.startup_timeout_s, log_file=self.logs / "triton.log"
        )
        self.triton_url = self.triton.grpc_url
        self.triton_metrics_url = self.triton.metrics_url

    def stop_triton(self) -> None:
        if self.triton is not None:
            self.triton.stop()

    # ------------------------------------------------------------------ shards
    def start_shards(self) -> None:
        """`shards` shards with `replicas` processes each. Process (and data folder) names: `shard-<i>` for
        the first replica, `shard-<i>-r<j>` for the others."""
        replicas: dict[str, list[str]] = {}
        self.shard_ports = {}
        for i in range(self.config.shards):
            name = f"shard-{i}"
            replicas[name] = []
            for j in range(self.config.replicas):
                process_name = name if j == 0 else f"{name}-r{j}"
                self.shard_ports[process_name] = (free_port(), free_port())
                self._spawn_shard(process_name)
                replicas[name].append(f"{HOST}:{self.shard_ports[process_name][0]}")
        for process_name, (port, _) in self.shard_ports.items():
            wait_for_port(
                HOST,
                port,
                timeout_s=self.config.startup_timeout_s,
                process=self.processes[process_name].process,
                name=process_name,
                log_path=self.processes[process_name].log_path,
            )
        self.shard_addresses = [replicas[f"shard-{i}"][0] for i in range(self.config.shards)]
        self.shard_metrics_ports = [metrics for _, metrics in self.shard_ports.values()]
        self.shard_map = ShardMap(
            shards={name: tuple(addresses) for name, addresses in replicas.items()},
            categories={c: f"shard-{i}" for c, i in self.config.pinned_categories.items()},
        )

    def _spawn_shard(self, process_name: str) -> ManagedProcess:
        port, metrics_port = self.shard_ports[process_name]
        return self._spawn(
            process_name,
            [
                *console_script("imgsearch-shard"),
                "--data-dir",
                str(self.work_dir / process_name),
                "--host",
                HOST,
                "--port",
                str(port),
                "--metrics-port",
                str(metrics_port),
                *self.config.shard_args,
            ],
        )

    def restart_shard(self, index: int | str, *, stop_requested: Callable[[], bool] | None = None) -> None:
        """Start a stopped shard process again on the same port and data folder (index, or process name); the
        wait for its port ends early (InterruptedError) once `stop_requested()` is true."""
        process_name = f"shard-{index}" if isinstance(index, int) else index
        proc = self._spawn_shard(process_name)
        wait_for_port(
            HOST, self.shard_ports[process_name][0], timeout_s=60, process=proc.process, name=process_name,
            stop_requested=stop_requested, log_path=proc.log_path,
        )

    # ------------------------------------------------------------------ broker
    def start_broker(self) -> None:
        port = self.config.broker_port or free_port()
        metrics_port = self.config.broker_metrics_port or free_port()
        _write_atomically(self.work_dir / "shard-map.json", self.shard_map.to_json())
        argv = [
            *console_script("imgsearch-broker"),
            "--host",
            HOST,
            "--port",
            str(port),
            "--metrics-port",
            str(metrics_port),
            "--shard-map",
            str(self.work_dir / "shard-map.json"),
            "--triton-url",
            self.triton_url,
            "--search-timeout-s",
            str(self.config.search_timeout_s),
            "--redis-timeout-s",
            str(self.config.redis_timeout_s),
            "--ingest-concurrency",
            str(self.config.ingest_concurrency),
            # A local stack is ready once all of it is: shards loading a big data dir may take longer than the
            # broker's own 30 s before it serves with part of them (a demo or eval would then be partial).
            "--ready-wait-s",
            str(self.config.startup_timeout_s),
        ]
        if self.redis_url:
            argv += ["--redis-url", self.redis_url]
        env = {"IMGSEARCH_WRITE_TOKEN": self.config.write_token} if self.config.write_token else {}
        proc = self._spawn("broker", argv, env)
        wait_for_port(HOST, port, timeout_s=60, process=proc.process, name="imgsearch-broker",
                      log_path=proc.log_path)
        self.broker_address = f"{HOST}:{port}"
        self.broker_metrics_port = metrics_port

    def wait_until_serving(self) -> None:
        from broker.client import SyncBrokerClient

        with SyncBrokerClient(self.broker_address) as client:
            client.wait_until_serving(timeout_s=self.config.startup_timeout_s)
        broker = self.processes["broker"]
        if not broker.running:  # what answered was not ours
            raise RuntimeError(f"imgsearch-broker exited with code {broker.process.returncode} (see {self.logs})")

    def describe(self) -> dict[str, object]:
        return {
            "broker": self.broker_address,
            "broker_metrics": f"http://{HOST}:{self.broker_metrics_port}/metrics",
            "triton": self.triton_url,
            "triton_metrics": self.triton_metrics_url,
            "shards": {k: ", ".join(v) for k, v in self.shard_map.shards.items()} if self.shard_map else {},
            "shard_metrics": [f"http://{HOST}:{p}/metrics" for p in self.shard_metrics_ports],
            "redis": self.redis_url,
            "logs": str(self.logs),
        }
