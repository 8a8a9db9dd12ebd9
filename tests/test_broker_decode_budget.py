"""broker.decode_budget: how many pixels the broker decodes at once (a 40 Mpx PNG of 170 KB takes ~500 MB to
decode; three at once took a broker past its 1 GiB limit). Unit tests of the budget, then the broker's use of
it with a stand-in for the decoder (what is measured is how many decodes overlap, not the decoding)."""

import asyncio
import io
import threading
import time

import pytest
from PIL import Image

from broker import core
from broker.core import Broker
from broker.decode_budget import PixelBudget, header_pixels
from broker.types import Query
from imgsearch.errors import DeadlineExceededError


def _png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGBA", (width, height), (10, 200, 30, 128)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_header_pixels_reads_the_size_without_decoding_and_zero_for_garbage():
    assert header_pixels(_png(300, 200)) == 60_000
    assert header_pixels(b"not an image") == 0
    assert header_pixels(b"") == 0


async def test_small_images_share_the_budget_and_a_big_one_waits_for_room_in_turn():
    budget, events = PixelBudget(100), []

    async def decode(name, pixels, hold_s):
        async with budget.hold(pixels, timeout_s=5):
            events.append(f"{name} in")
            await asyncio.sleep(hold_s)
            events.append(f"{name} out")

    await asyncio.gather(
        decode("small-1", 30, 0.1), decode("small-2", 30, 0.1),  # together: 60 of 100
        decode("big", 90, 0.05),  # waits for both smalls
        decode("small-3", 10, 0),  # arrived after big: waits its turn although 10 would fit at once
        decode("huge", 10_000, 0),  # more than the whole budget: holds all of it, never waits forever
    )
    assert events.index("small-2 in") < events.index("small-1 out")
    assert events.index("big in") > max(events.index("small-1 out"), events.index("small-2 out"))
    assert events.index("small-3 in") > events.index("big in")
    assert events.index("huge in") > events.index("big out")


async def test_a_waiter_past_its_deadline_is_deadline_exceeded_and_does_not_block_those_behind():
    budget = PixelBudget(100)
    holder = asyncio.Event()

    async def hold_all():
        async with budget.hold(100, timeout_s=5):
            holder.set()
            await asyncio.sleep(0.3)

    blocking = asyncio.create_task(hold_all())
    await holder.wait()
    with pytest.raises(DeadlineExceededError):
        async with budget.hold(50, timeout_s=0.05):
            pass
    started = time.monotonic()
    async with budget.hold(50, timeout_s=5):  # came after the one that gave up: served once room is back
        assert time.monotonic() - started < 1
    await blocking
    async with budget.hold(100, timeout_s=0.01):
        pass  # everything was given back


class OverlapCountingDecoder:
    """Stands in for the hashing decoder: takes `decode_s`, records how many decodes overlap at most, and fails
    the search (only the decode matters here)."""

    def __init__(self, decode_s: float):
        self.decode_s, self.running, self.most = decode_s, 0, 0
        self._lock = threading.Lock()

    def __call__(self, data, **limits):
        with self._lock:
            self.running += 1
            self.most = max(self.most, self.running)
        time.sleep(self.decode_s)
        with self._lock:
            self.running -= 1
        raise core.InvalidRequestError("stand-in decoder")


def _broker(**limits) -> Broker:
    """A broker with only what an image search needs before the embedding: a budget of one 1 Mpx image."""
    return Broker(pool=None, embedder=None, cache=None, repair=None, dimension=8, max_image_bytes=1 << 22,
                  max_image_pixels=1_000_000, **{"max_decoding_pixels": 1_000_000, **limits})


async def test_the_broker_decodes_big_images_one_at_a_time_and_small_ones_together(monkeypatch):
    """Searches with images: at most max_decoding_pixels are being decoded at any moment."""
    decoder = OverlapCountingDecoder(0.05)
    monkeypatch.setattr(core, "hashes_of_bytes", decoder)
    broker = _broker()

    async def searches(image: bytes, n: int) -> None:
        results = await asyncio.gather(
            *(broker.search(Query(image=image, top_k=3), timeout_s=5) for _ in range(n)), return_exceptions=True)
        assert all(isinstance(r, core.InvalidRequestError) for r in results), results

    await searches(_png(1000, 1000), 4)  # each the whole budget
    assert decoder.most == 1
    decoder.most = 0
    await searches(_png(100, 100), 4)  # 10,000 pixels each: side by side
    assert decoder.most > 1


async def test_a_cancelled_search_keeps_its_pixels_until_its_decode_ends(monkeypatch):
    """grpc cancels a handler whose deadline passed, but the decoding thread runs on: its pixels must stay held
    until it ends, or callers with short deadlines would decode any number of big images at once."""
    decoder = OverlapCountingDecoder(0.2)
    monkeypatch.setattr(core, "hashes_of_bytes", decoder)
    broker = _broker()
    image = _png(1000, 1000)
    calls = [asyncio.wait_for(broker.search(Query(image=image, top_k=3), timeout_s=5), 0.05) for _ in range(4)]
    assert all(isinstance(r, asyncio.TimeoutError | core.InvalidRequestError)
               for r in await asyncio.gather(*calls, return_exceptions=True))
    await asyncio.sleep(1.0)  # every decode started has ended
    assert decoder.most == 1


async def test_bytes_that_hold_no_pixels_do_not_wait_behind_a_big_decode(monkeypatch):
    """Garbage (no readable header) is refused at once, not queued behind an image being decoded."""
    release = threading.Event()

    def blocking_hashes(data, **limits):
        release.wait(5)
        raise core.InvalidRequestError("stand-in decoder")

    monkeypatch.setattr(core, "hashes_of_bytes", blocking_hashes)
    broker = _broker()
    big = asyncio.create_task(broker.search(Query(image=_png(1000, 1000), top_k=3), timeout_s=5))
    await asyncio.sleep(0.05)
    monkeypatch.setattr(core, "hashes_of_bytes", lambda data, **limits: (_ for _ in ()).throw(
        core.InvalidRequestError("not an image")))
    started = time.monotonic()
    with pytest.raises(core.InvalidRequestError):
        await broker.search(Query(image=b"garbage bytes", top_k=3), timeout_s=0.5)
    assert time.monotonic() - started < 0.4
    release.set()
    with pytest.raises(core.InvalidRequestError):
        await big


async def test_the_image_header_is_read_off_the_event_loop(monkeypatch):
    """Pillow inflates a PNG's text chunks while reading its header: a 65 KB upload of zTXt chunks took 0.2 s,
    which on the event loop held every other call."""
    threads = []

    def spy(data):
        threads.append(threading.current_thread() is threading.main_thread())
        return 0

    monkeypatch.setattr(core, "header_pixels", spy)
    monkeypatch.setattr(core, "hashes_of_bytes", lambda data, **limits: (_ for _ in ()).throw(
        core.InvalidRequestError("stand-in decoder")))
    broker = _broker(max_decoding_pixels=None)
    with pytest.raises(core.InvalidRequestError):
        await broker.search(Query(image=_png(10, 10), top_k=3), timeout_s=5)
    assert threads == [False]
