"""`imgsearch up` as a user runs it: the whole stack in the foreground, addresses printed, a working broker,
and Ctrl-C (SIGINT) stops every process it started."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from broker.client import SyncBrokerClient
from broker.stack import console_script, free_port

pytestmark = pytest.mark.slow


def _listening(address: str) -> bool:
    host, port = address.replace("redis://", "").split("/")[0].rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=0.5):
            return True
    except OSError:
        return False


def test_up_serves_and_ctrl_c_stops_everything(tmp_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "IMGSEARCH_WRITE_TOKEN")}
    proc = subprocess.Popen(
        [
            *console_script("imgsearch"),
            "up",
            "--shards",
            "2",
            "--port",
            str(port),
            "--metrics-port",
            "0",
            "--work-dir",
            str(tmp_path / "stack"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,  # its own process group, so a failed test can still stop the children
    )
    try:
        deadline = time.monotonic() + 240
        output = _output_until(proc, "ready:", deadline)
        assert "ready:" in output, output
        addresses = re.findall(r"(?:redis://)?127\.0\.0\.1:\d+(?:/0)?", output)
        assert f"127.0.0.1:{port}" in addresses and len(addresses) >= 5  # broker, triton, 2 shards, redis
        with SyncBrokerClient(f"127.0.0.1:{port}") as client:
            shards = client.stats(timeout_s=10)
            assert [s.reachable for s in shards] == [True, True]
        assert all(_listening(a) for a in addresses)

        # A shard process that dies is restarted on its port, from its data folder (it stopped the whole stack)
        victim = _pids_with(f"--port {shards[1].address.rsplit(':', 1)[1]} ")
        assert len(victim) == 1
        os.kill(victim[0], signal.SIGKILL)
        restarted = _output_until(proc, "shard-1 is back", deadline)
        assert "shard-1 exited (code -9); restarting it" in restarted and "shard-1 is back" in restarted, restarted
        with SyncBrokerClient(f"127.0.0.1:{port}") as client:
            assert [s.reachable for s in client.stats(timeout_s=10)] == [True, True]

        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=90)
        assert proc.returncode == 0, rest
        assert "stopped." in rest
        assert not any(_listening(a) for a in addresses), addresses
        # every process's log stays in <work-dir>/logs, Triton's included
        logs = {p.name for p in (tmp_path / "stack" / "logs").iterdir()}
        assert {"broker.log", "triton.log", "redis.log", "shard-0.log", "shard-1.log"} <= logs, logs
        assert (tmp_path / "stack" / "logs" / "triton.log").stat().st_size > 0
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # the clean path first: `up` stops what it started
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)


def _output_until(proc: subprocess.Popen, prefix: str, deadline: float) -> str:
    """What `proc` prints up to and including its first line starting with `prefix` (or its end, or the
    deadline)."""
    lines = []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        lines.append(line)
        if not line or line.startswith(prefix):
            break
    return "".join(lines)


def _pids_with(text: str) -> list[int]:
    """Processes whose command line holds `text` (arguments joined by spaces, with a trailing one)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                command = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if text in command:
                found.append(int(entry))
    return found


def test_up_stops_everything_when_triton_dies(tmp_path):
    # Triton was not watched: killed, it left the stack "ready" with every image search failing UNAVAILABLE, and
    # its python-backend stubs running (review of 2026-12-05).
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "IMGSEARCH_WRITE_TOKEN")}
    work = tmp_path / "stack"
    proc = subprocess.Popen(
        [*console_script("imgsearch"), "up", "--shards", "1", "--port", str(port), "--metrics-port", "0",
         "--work-dir", str(work)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True,
    )
    try:
        output = _output_until(proc, "ready:", time.monotonic() + 240)
        assert "ready:" in output, output
        triton = sorted(set(_pids_with(str(work))) & set(_pids_with("bin/tritonserver ")))  # its model repository
        assert len(triton) == 1, "the stack's tritonserver not found"
        os.kill(triton[0], signal.SIGKILL)
        rest, _ = proc.communicate(timeout=90)
        assert proc.returncode == 1, rest
        assert "stopping: triton exited" in rest and "stopped." in rest, rest
        assert not _listening(f"127.0.0.1:{port}")
        assert not [pid for pid in _pids_with("triton_python_backend_stub") if _in_group_of(pid, triton)]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def _in_group_of(pid: int, group_pids: list[int]) -> bool:
    try:
        return os.getpgid(pid) in group_pids
    except ProcessLookupError:
        return False


_SLOW_TRITON_UP = """
import sys, time
from broker import stack
def slow_triton(self):  # Triton takes tens of seconds to start (up to startup_timeout_s)
    time.sleep(60)
stack.LocalStack.start_triton = slow_triton
from broker.cli import main
sys.exit(main(["up", "--work-dir", sys.argv[1], "--port", "0", "--metrics-port", "0"]))
"""


def _redis_servers_in(work_dir) -> list[int]:
    """redis-server processes whose working directory lies under `work_dir`."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                command = Path(f"/proc/{entry}/cmdline").read_bytes().decode(errors="replace")
                if "redis-server" in command and os.readlink(f"/proc/{entry}/cwd").startswith(str(work_dir)):
                    found.append(int(entry))
            except OSError:
                continue
    return found


@pytest.mark.timeout(120)
def test_sigterm_during_start_up_stops_what_has_started_at_once(tmp_path):
    """A supervisor's SIGTERM while `imgsearch up` is still starting (Triton here takes a minute) must stop the
    stack now, not after start-up: a supervisor escalating to SIGKILL would otherwise orphan redis-server."""
    up = subprocess.Popen([sys.executable, "-c", _SLOW_TRITON_UP, str(tmp_path)], cwd=tmp_path,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not _redis_servers_in(tmp_path):  # start-up has got as far as Redis
            assert up.poll() is None and time.monotonic() < deadline, up.stdout.read().decode(errors="replace")
            time.sleep(0.1)
        up.send_signal(signal.SIGTERM)
        assert up.wait(10) == 130
        time.sleep(0.5)
        assert _redis_servers_in(tmp_path) == []
    finally:
        if up.poll() is None:
            up.kill()
        for pid in _redis_servers_in(tmp_path):
            os.kill(pid, signal.SIGKILL)


def test_a_process_that_exits_before_listening_is_reported_with_the_last_line_of_its_log(tmp_path):
    """`up` said only "shard-0 exited with code 1 before listening"; why (its data dir in use by another stack) was
    in the shard's log alone (review)."""
    from broker.stack import wait_for_port

    log = tmp_path / "shard-0.log"
    with open(log, "wb") as out:
        script = "import sys; print('starting'); sys.exit('imgsearch-shard: data dir d is in use by another process')"
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=out, stderr=subprocess.STDOUT)
    with pytest.raises(RuntimeError, match=r"exited with code 1 before listening on \d+: imgsearch-shard: data dir d "
                                           r"is in use by another process$"):
        wait_for_port("127.0.0.1", free_port(), timeout_s=30, process=proc, name="shard-0", log_path=log)


def test_a_work_dir_is_started_again_only_with_its_layout_and_model(tmp_path, monkeypatch):
    """Started again with more replicas, the new ones were empty and searches alternated between hits and none;
    and IMGSEARCH_MODEL was ignored on a work dir whose Triton repository held the old model (review): a work
    dir's catalogue keeps the layout and model it was stored with, and another one is refused before anything
    starts. Whether it holds a catalogue is told by the shards' data: a start that failed or was interrupted, even
    after it wrote its shard map, holds nothing and takes any layout (reviews of the first two versions); a work
    dir of an older version is judged by its shard map, else its shards' folders, and its Triton repository."""
    import json

    from broker.stack import LAYOUT_FILE, LocalStack, StackConfig
    from embedder.model_files import default_model_path

    def check(**config) -> LocalStack:
        stack = LocalStack(StackConfig(work_dir=tmp_path, **config))
        stack.check_layout()
        return stack

    def shard_folders(*names: str, data: bool) -> None:
        for name in names:
            (tmp_path / name / "wal").mkdir(parents=True, exist_ok=True)
            (tmp_path / name / "wal" / "000000000001.wal2").write_bytes(b"\xa5\x1e\xb3\x0f..." if data else b"")

    monkeypatch.delenv("IMGSEARCH_MODEL", raising=False)
    other_model = tmp_path / "other.onnx"
    other_model.write_bytes(default_model_path().read_bytes() + b"\0")
    # a first start that failed after writing its layout and shard map: nothing stored, anything goes
    (tmp_path / "triton-repo").mkdir()
    shard_folders("shard-0", "shard-1", "shard-2", data=False)
    (tmp_path / LAYOUT_FILE).write_text(json.dumps({"shards": 3, "replicas": 1, "pinned_categories": {}}))
    (tmp_path / "shard-map.json").write_text(json.dumps({"shards": {"shard-0": ["a"], "shard-1": ["b"]}}))
    check(shards=2, model_path=other_model)
    assert not (tmp_path / "triton-repo").exists() and not (tmp_path / LAYOUT_FILE).exists()
    # a start that served and stored
    shard_folders("shard-0", "shard-1", data=True)
    check(shards=2).record_layout()
    assert json.loads((tmp_path / LAYOUT_FILE).read_text())["shards"] == 2
    check(shards=2)  # as it was
    with pytest.raises(ValueError, match="replicas 1 -> 2"):
        check(shards=2, replicas=2)
    with pytest.raises(ValueError, match="shards 2 -> 3"):
        check(shards=3)
    with pytest.raises(ValueError, match="pinned_categories"):
        check(shards=2, pinned_categories={"Milk": 1})
    with pytest.raises(ValueError, match="another model"):
        check(shards=2, model_path=other_model)
    monkeypatch.setenv("IMGSEARCH_MODEL", str(other_model))
    with pytest.raises(ValueError, match="another model"):
        check(shards=2)
    monkeypatch.delenv("IMGSEARCH_MODEL")
    with pytest.raises(ValueError, match="not found"):
        check(shards=2, model_path=tmp_path / "missing.onnx")
    # a work dir of an older version: no layout file, the shard map and Triton repository of its last start
    (tmp_path / LAYOUT_FILE).unlink()
    (tmp_path / "shard-map.json").write_text(json.dumps(
        {"shards": {"shard-0": ["127.0.0.1:1"], "shard-1": ["127.0.0.1:2"]}, "categories": {"Milk": "shard-1"}}))
    served = tmp_path / "triton-repo" / "imgsearch_embedding" / "1" / "model.onnx"
    served.parent.mkdir(parents=True)
    served.write_bytes(other_model.read_bytes())
    check(shards=2, pinned_categories={"Milk": 1}, model_path=other_model)
    with pytest.raises(ValueError, match="replicas 1 -> 2"):
        check(shards=2, replicas=2, pinned_categories={"Milk": 1}, model_path=other_model)
    with pytest.raises(ValueError, match="another model"):  # the repository serves other.onnx
        check(shards=2, pinned_categories={"Milk": 1})
    for unreadable in ("[]", "{", '{"shards": 2}'):  # falls back on the shard map
        (tmp_path / LAYOUT_FILE).write_text(unreadable)
        with pytest.raises(ValueError, match="shards 2 -> 1"):
            check(shards=1, pinned_categories={"Milk": 1}, model_path=other_model)
    # neither file tells: refused (a larger layout lost categories, review), saying what the shards' folders that
    # hold data show and how to write the layout; nothing is deleted
    (tmp_path / "shard-map.json").write_text("{")
    shard_folders("shard-0-r1", data=True)
    for shards in (1, 2, 3):
        with pytest.raises(ValueError, match=r"at least 2 shard\(s\) x 2 replica.*Write the layout"):
            check(shards=shards, replicas=2, model_path=other_model)
    assert served.is_file()
    (tmp_path / LAYOUT_FILE).write_text(json.dumps({"shards": 2, "replicas": 2, "pinned_categories": {"Milk": 1}}))
    check(shards=2, replicas=2, pinned_categories={"Milk": 1}, model_path=other_model)
    # a layout written by hand, smaller than the shards that hold data
    (tmp_path / LAYOUT_FILE).write_text(json.dumps({"shards": 1, "replicas": 1, "pinned_categories": {}}))
    with pytest.raises(ValueError, match="more than 1 x 1"):
        check(shards=1, model_path=other_model)


def test_a_relative_work_dir_is_resolved(tmp_path, monkeypatch):
    """The stack's processes run in the work dir, and were given paths relative to the caller's folder: a relative
    --work-dir made redis-server refuse its `dir` (review)."""
    from broker.stack import LocalStack, StackConfig

    monkeypatch.chdir(tmp_path)
    assert LocalStack(StackConfig(work_dir=Path("w"))).work_dir == tmp_path / "w"
