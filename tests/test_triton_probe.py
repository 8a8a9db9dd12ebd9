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
    """The python-backend stub processes of imgsearch_preprocess started by this tritonserver (from /proc: `ps`
    cuts command lines at $COLUMNS)."""
    stubs = []
    for proc in Path("/proc").iterdir():
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            args = (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except (OSError, ValueError, IndexError):  # not a process, or gone meanwhile
            continue
        if ppid == server_pid and args[0].endswith("triton_python_backend_stub") and any(
                a.startswith(f"{PREPROCESS_MODEL}_") for a in args):  # the instance name, imgsearch_preprocess_0_0
            stubs.append(int(proc.name))
    return stubs


def test_the_probe_image_is_a_valid_image():
    assert preprocess_bytes(tiny_png()).shape == (3, 224, 224)


def test_the_probe_fails_in_one_line_on_a_closed_port_and_on_a_silent_server():
    _assert_fails_with(_probe("--url", f"127.0.0.1:{free_port()}"), "connection refused")
    with socket.socket() as silent:  # accepts connections (the backlog) but never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        port = silent.getsockname()[1]
        _assert_fails_with(_probe("--url", f"127.0.0.1:{port}", "--timeout-s", "0.5"), "within 0.5s")


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
