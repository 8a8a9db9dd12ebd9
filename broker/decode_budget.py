"""How many image pixels the broker decodes at once.

Decoding for the perceptual hashes takes ~12 bytes per pixel at its peak (a 40 Mpx RGBA PNG: ~500 MB, from a
170 KB upload). Each search and ingest decodes on a thread of its own, so two or three such uploads at once took
a broker past its 1 GiB memory limit. Ordinary photos (a few Mpx) decode side by side as before; a big one waits
for room, in arrival order, so a stream of small images cannot starve it.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import itertools
from collections.abc import AsyncIterator

from PIL import Image

from broker.errors import DecodeWaitTimeoutError
from embedder.preprocess import check_header_segments


def header_pixels(data: bytes) -> int:
    """Width x height from the image header (nothing decoded); 0 when the header does not parse (the decoder
    then reports what is wrong with the bytes)."""
    try:
        check_header_segments(data)  # Pillow would read each one in Python first
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
    except Exception:  # noqa: BLE001 - any unreadable header: not ours to report here
        return 0
    return max(0, width) * max(0, height)


class PixelBudget:
    """First come, first served room for `pixels` units: image pixels being decoded, or (`unit="bytes"`) upload
    bytes of IngestStream chunks in flight (broker/service.py)."""

    def __init__(self, pixels: int, *, unit: str = "pixel") -> None:
        if pixels <= 0:
            raise ValueError(f"a {unit} budget must be positive, got {pixels}")
        self.pixels = pixels
        self.unit = unit
        self._free = pixels
        self._changed = asyncio.Condition()
        self._tickets = itertools.count()
        self._serving = 0  # the ticket whose turn it is: first come, first served
        self._skipped: set[int] = set()  # tickets of waiters that left before their turn
        self._releasing: set[asyncio.Task] = set()

    @contextlib.asynccontextmanager
    async def hold(self, pixels: int, *, timeout_s: float) -> AsyncIterator[None]:
        """Hold room for decoding `pixels` (at most the whole budget); raises DecodeWaitTimeoutError
        (DEADLINE_EXCEEDED) when none comes within `timeout_s`."""
        held = await self.acquire(pixels, timeout_s=timeout_s)
        try:
            yield
        finally:
            await self.release(held)

    async def acquire(self, amount: int, *, timeout_s: float) -> int:
        """Take room for `amount` (at most the whole budget) once it is this caller's turn and there is room;
        returns what was taken, for release(). DecodeWaitTimeoutError (DEADLINE_EXCEEDED) past `timeout_s`."""
        want = min(max(amount, 0), self.pixels)
        ticket = next(self._tickets)
        try:
            async with asyncio.timeout(timeout_s), self._changed:
                await self._changed.wait_for(lambda: self._serving == ticket and self._free >= want)
                self._free -= want
                self._next_turn()
        except TimeoutError:
            await asyncio.shield(self._give_up(ticket))  # its turn is skipped even if cancelled again
            what = f"a {amount}-pixel image" if self.unit == "pixel" else f"{amount} {self.unit}"
            raise DecodeWaitTimeoutError(
                f"no room for {what} within {timeout_s:.3f}s (others in flight first)"
            ) from None
        except BaseException:
            await asyncio.shield(self._give_up(ticket))  # its turn is skipped even if cancelled again
            raise
        return want

    async def release(self, amount: int) -> None:
        async with self._changed:
            self._free += amount
            self._changed.notify_all()

    def release_soon(self, amount: int) -> None:
        """release() from a synchronous callback (a task's done callback)."""
        task = asyncio.get_running_loop().create_task(self.release(amount))
        self._releasing.add(task)  # the event loop keeps only weak references to tasks
        task.add_done_callback(self._releasing.discard)

    async def _give_up(self, ticket: int) -> None:
        """A waiter that leaves must not hold up those behind it: its turn is skipped."""
        async with self._changed:
            if ticket == self._serving:
                self._next_turn()
            else:
                self._skipped.add(ticket)
                self._changed.notify_all()

    def _next_turn(self) -> None:
        """The next waiter's turn (past those that left); the caller holds the condition's lock."""
        self._serving += 1
        while self._serving in self._skipped:
            self._skipped.discard(self._serving)
            self._serving += 1
        self._changed.notify_all()
