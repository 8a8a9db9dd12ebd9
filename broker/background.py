"""Stopping the broker's background loops (the cache repair queue, the stale-copy removal hints)."""

from __future__ import annotations

import asyncio
import contextlib


async def stop_task(task: asyncio.Task) -> None:
    """Cancel `task` and wait until it has ended. A cancel can be lost: on Python 3.11 asyncio.wait_for returns
    its result and drops a cancel that arrives in the loop step the awaited call completes (gh-86296), and a
    stop that cancelled once then waited for good (1 hang in 15 runs, review of 2026-12-05); so ask again."""
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=0.1)
    with contextlib.suppress(asyncio.CancelledError):
        await task
