"""embedder.triton_probe, the Triton pod's liveness probe, against a real Triton: it passes on a healthy server
and fails once the python-backend stub of imgsearch_preprocess is killed, which /v2/health/* does not notice."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from embedder.model_files import default_model_path
from embedder.preprocess import preprocess_bytes
from embedder.triton_probe import tiny_png
from embedder.triton_repo import PREPROCESS_MODEL, RepositoryOptions, write_model_repository
from embedder.triton_server import start_triton
from imgsearch.ports import free_port

REPO_ROOT = Path(__file__).resolve().parents[1]


def _probe(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "embedder.triton_probe", *args], capture_output=True, text=True,
                          timeout=60, cwd=REPO_ROOT)


def _assert_fails_with(result: subprocess.CompletedProcess, text: str) -> None:
    assert result.returncode == 1, (result.returncode, result.stderr)
    assert text in result.stderr, result.stderr
    assert len(result.stderr.splitlines()) == 1 and "Traceback" not in result.stderr, result.stderr


def _preprocess_stubs(server_pid: int) -> list[int]:
    """The python-backend stub processes of imgsearch_preprocess started by this tritonserver (the probe's own
    /proc reading: `ps` cuts command lines at $COLUMNS)."""
    from embedder.triton_probe import _processes

    return [pid for pid, ppid, args in _processes()
            if ppid == server_pid and args[0].endswith("triton_python_backend_stub")
            and any(a.startswith(f"{PREPROCESS_MODEL}_") for a in args)]  # the instance, imgsearch_preprocess_0_0


def test_the_probe_image_is_a_valid_image():
    assert preprocess_bytes(tiny_png()).shape == (3, 224, 224)


def test_the_probe_fails_in_one_line_on_a_closed_port_and_on_a_silent_server():
    _assert_fails_with(_probe("--url", f"127.0.0.1:{free_port()}"), "connection refused")
    with socket.socket() as silent:  # accepts connections (the backlog) but never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        port = silent.getsockname()[1]
        _assert_fails_with(_probe("--url", f"127.0.0.1:{port}", "--timeout-s", "0.5"),
                           "not even to /v2/health/live")


def test_a_busy_server_that_is_still_live_passes():
    """The probe's image queues behind real traffic: on a busy CPU pod it took 6-9 s, and a healthy pod was
    restarted after three probes (review of 2026-12-06). A server that does not answer the inference in time but
    answers /v2/health/live is busy, not dead (a stand-in HTTP server: a unit test of the probe)."""
    import http.server
    import threading

    class Busy(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            self.send_response(200 if self.path == "/v2/health/live" else 404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def do_POST(self):  # noqa: N802
            threading.Event().wait(2.0)  # queued behind real traffic

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Busy)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        busy = _probe("--url", f"127.0.0.1:{server.server_port}", "--timeout-s", "0.5")
        assert busy.returncode == 0, busy.stderr
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.slow
def test_the_probe_passes_on_a_healthy_triton_and_fails_once_a_stub_is_killed(tmp_path):
    options = RepositoryOptions(max_batch_size=8, preferred_batch_sizes=(4, 8), intra_op_threads=1)
    repo = write_model_repository(tmp_path / "repo", model_path=default_model_path(), embedding_backend="python",
                                  options=options)
    # Our own server: killing a stub of a shared one would break other tests.
    server = start_triton(repo)
    try:
        url = f"127.0.0.1:{server.http_port}"
        good = _probe("--url", url)
        assert good.returncode == 0 and good.stderr == "", good.stderr
        _assert_fails_with(_probe("--url", url, "--model", "no_such_model"), "unknown model")

        stubs = _preprocess_stubs(server.pid)
        assert len(stubs) == 1, stubs
        os.kill(stubs[0], signal.SIGKILL)
        _assert_fails_with(_probe("--url", url), "not healthy")
        # What the probe is for: Triton's own health endpoints still say all is well.
        for path in ("/v2/health/live", "/v2/health/ready"):
            assert urllib.request.urlopen(server.http_url + path, timeout=10).status == 200, path
        _assert_fails_with(_probe("--url", url), "not healthy")
    finally:
        server.stop()


@pytest.mark.slow
def test_the_probe_fails_every_time_once_one_of_several_stubs_is_killed(tmp_path):
    """With two decoding instances and one stub dead, only the requests that reached it failed: the probe passed
    every other time and the pod was never restarted (review of 2026-12-06). It counts the server's stubs."""
    options = RepositoryOptions(max_batch_size=8, preferred_batch_sizes=(4, 8), intra_op_threads=1,
                                preprocess_instances=2)
    repo = write_model_repository(tmp_path / "repo", model_path=default_model_path(), embedding_backend="python",
                                  options=options)
    server = start_triton(repo)
    try:
        url = f"127.0.0.1:{server.http_port}"
        assert _probe("--url", url).returncode == 0
        stubs = _preprocess_stubs(server.pid)
        assert len(stubs) == 2, stubs
        os.kill(stubs[0], signal.SIGKILL)
        from embedder.triton_probe import missing_stubs

        assert "1 of the 2 processes of model imgsearch_preprocess" in (missing_stubs(url, 5.0) or "")
        for _ in range(4):  # every time, not every other time: by the inference that reached it, else the count
            failed = _probe("--url", url)
            assert failed.returncode == 1, failed.stderr
            assert "1 of the 2 processes" in failed.stderr or "not healthy" in failed.stderr, failed.stderr
    finally:
        server.stop()
