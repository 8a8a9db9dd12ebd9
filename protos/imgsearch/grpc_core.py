"""The I/O engine of grpc's C core for our processes, chosen before grpc is first imported.

grpc 1.81 serves and calls over its newer EventEngine by default. On our 2-core development box its older
I/O manager (iomgr) is markedly cheaper for the small unary calls of a search: two bare grpc.aio hops 1.23 ->
0.98 ms p50, the broker's two hops over an echo shard 1.74 -> 1.50 ms (``python -m shard_server.hop_floor
--experiments 3``; docs/benchmarks.md, "Where targets are missed"). The choice is grpc's
``GRPC_EXPERIMENTS`` environment variable, which the core reads once, when ``grpc`` is imported; setting it
later has no effect. So the ``broker`` and ``shard_server`` packages call :func:`prefer_iomgr` first thing,
which sets the variable only where nobody has: ``GRPC_EXPERIMENTS=`` (empty) keeps grpc's own defaults, and
child processes inherit whichever was chosen. A grpc release that drops these experiments logs "Unknown
experiment" once at start and carries on with its defaults.
"""

from __future__ import annotations

import os

# Turn off the EventEngine for client channels and for listening servers (both are needed for the gain).
IOMGR_EXPERIMENTS = "-event_engine_client,-event_engine_listener"


def prefer_iomgr() -> None:
    """Select iomgr for this process and its children unless GRPC_EXPERIMENTS is already set."""
    os.environ.setdefault("GRPC_EXPERIMENTS", IOMGR_EXPERIMENTS)
