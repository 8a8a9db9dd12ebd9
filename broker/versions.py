"""Write versions: each ingest and delete gets the broker's clock in nanoseconds, and shards keep an image id's
highest version whatever order writes reach them in (VectorRecord.version, ShardServiceDeleteRequest.version).

So two replicas that receive two brokers' writes of one id in opposite orders end up alike, a stale-copy removal
of one ingest never takes the newer copy another broker just wrote, and a delete is not undone by an older write
that arrives after it. Last writer wins by wall clock: writes of one id through brokers whose clocks differ by
more than the time between the writes are ordered by the clocks, not by arrival (keep the brokers on NTP).
"""

from __future__ import annotations

import threading
import time


class WriteClock:
    """time.time_ns(), strictly increasing within this process (two writes in one nanosecond, or the wall clock
    stepped back, still get increasing versions)."""

    def __init__(self) -> None:
        self._last = 0
        self._lock = threading.Lock()

    def next(self) -> int:
        with self._lock:
            self._last = max(self._last + 1, time.time_ns())
            return self._last
