"""Loopback ports for the processes a local stack, a benchmark or a test starts.

A port from ``bind(port 0)`` comes from the kernel's ephemeral range, the range the local end of every outgoing
connection is drawn from too. Between picking such a port and the server binding it, any connection on the
machine (a client to Redis, Triton's own sockets) can take it, and the server then fails with "Address already in
use" (a shard's metrics port was lost so in a test run). So ports are picked at random *below* the ephemeral
range, checked free by binding them, and never handed out twice by one process.
"""

from __future__ import annotations

import random
import socket
import threading
from pathlib import Path

_EPHEMERAL_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_LOWEST_PORT = 10_000
_ATTEMPTS = 200

_lock = threading.Lock()
_handed_out: set[int] = set()


def ephemeral_range() -> tuple[int, int]:
    """The kernel's ephemeral port range (Linux's default where it cannot be read)."""
    try:
        low, high = (int(x) for x in _EPHEMERAL_RANGE_FILE.read_text().split())
    except (OSError, ValueError):
        return 32768, 60999
    return low, high


def _bindable(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago, outside the ephemeral range where there is room below it."""
    low, _ = ephemeral_range()
    with _lock:
        if low - _LOWEST_PORT >= 1000:
            for _ in range(_ATTEMPTS):
                port = random.randrange(_LOWEST_PORT, low)
                if port not in _handed_out and _bindable(host, port):
                    _handed_out.add(port)
                    return port
        while True:  # no room below the range, or all attempts taken: the kernel's pick
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.bind((host, 0))
                port = s.getsockname()[1]
            if port not in _handed_out:
                _handed_out.add(port)
                return port
