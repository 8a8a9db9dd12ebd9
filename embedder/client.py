"""The Embedder interface: encoded images in, L2-normalised 512-d embeddings out.

Two implementations with the same behaviour:

- `TritonEmbedder`: a Triton Inference Server over gRPC (tritonclient.grpc.aio) hosting the `imgsearch`
  ensemble (bytes in, embedding out; see embedder.triton_repo). The same code talks to a GPU Triton and to the
  CPU one of ``imgsearch-embed serve``.
- `OnnxEmbedder`: ONNX Runtime in this process, decoding with embedder.preprocess, in a worker thread.

Both micro-batch: concurrent `embed()` calls that arrive within `batch_window_s` (2 ms) are merged into one
inference of at most `max_batch` images, which is how a busy broker keeps the model's batch dimension full.
Every call takes a deadline (`timeout_s`). Errors are embedder.errors types: a bad image ->
InvalidImageError (only the caller that sent it fails, the others in its batch are retried on their own),
too large -> ImageTooLargeError (checked before anything is sent), server unreachable or not serving the
model -> EmbedderUnavailableError, deadline -> EmbedderTimeoutError.
"""

from __future__ import annotations

import abc
import asyncio
import collections
import contextlib
import itertools
import json
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from embedder.errors import (
    EmbedderError,
    EmbedderOverloadedError,
    EmbedderTimeoutError,
    EmbedderUnavailableError,
    ImageTooLargeError,
    InvalidImageError,
)
from embedder.model_files import INPUT_NAME, OUTPUT_NAME, default_model_path
from embedder.preprocess import DEFAULT_MAX_IMAGE_BYTES, DEFAULT_MAX_IMAGE_PIXELS, preprocess_bytes

EMBEDDING_DIM = 512
DEFAULT_MAX_BATCH = 32
DEFAULT_BATCH_WINDOW_S = 0.002
# Load shedding: the model's throughput (images/s while it has work) is measured over this much busy time.
RATE_WINDOW_S = 0.25
RATE_SMOOTHING = 0.3
# A request is taken only when the work ahead of it leaves this much of its deadline (at most half of it) for the
# estimate's error, the batch window and the answer's way back.
ADMIT_MARGIN_S = 0.1
# A batch in flight longer than twice its expected time plus this is taken as stuck, not as work ahead.
OVERDUE_SLACK_S = 0.5
# Bulk work (ingests) in flight at once, in seconds of the model's measured throughput: what a search that arrives
# during a bulk ingest may find ahead of it on the model.
BULK_INFLIGHT_S = 0.2
# ... in up to this many batches, so that several model instances or Triton pods share it (one batch at a time kept
# bulk work on one of them: 39 of 3 x 40 images/s, review of 2026-12-05).
BULK_BATCHES = 4
# When searches keep a bounded model (max_inflight) busy, bulk work that waits gets a batch of at least this share of
# the images sent for searches meanwhile, so ingests are slowed, not starved.
BULK_SHARE = 0.2
# A throughput sample may set or lower the estimate only if a batch of its window queued: took twice the quickest of
# the last LATENCY_WINDOW batches plus QUEUE_SLACK_S. On a model that runs calls side by side (a GPU Triton), light
# traffic measures the traffic, not the capacity, and a burst the model serves in milliseconds was refused (130 of
# 300 in a review); a real overload queues. (Gating the shedding itself on queueing instead made it switch itself
# off once it worked, and an overload served 15 searches/s instead of 35: a later review.)
LATENCY_WINDOW = 64
QUEUE_SLACK_S = 0.01


class Embedder(abc.ABC):
    """Images (encoded bytes) -> float32 (n, 512) L2-normalised embeddings."""

    @abc.abstractmethod
    async def embed(self, images: Sequence[bytes], *, timeout_s: float, bulk: bool = False) -> np.ndarray:
        """`bulk=True` for work that may wait behind searches (catalogue ingests; see MicroBatcher)."""

    @abc.abstractmethod
    async def ready(self, *, timeout_s: float) -> bool: ...

    @abc.abstractmethod
    async def close(self) -> None: ...

    async def __aenter__(self) -> Embedder:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


def check_sizes(images: Sequence[bytes], *, max_image_bytes: int) -> None:
    """Refuse empty and oversized images before any work is spent on them."""
    for i, data in enumerate(images):
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise InvalidImageError(f"image {i} is {type(data).__name__}, not bytes")
        if len(data) == 0:
            raise InvalidImageError(f"image {i} is empty")
        if len(data) > max_image_bytes:
            raise ImageTooLargeError(f"image {i} is {len(data)} bytes, limit is {max_image_bytes}")


# Runs one merged batch: (images, timeout_s) -> (n, 512).
RunBatch = Callable[[list[bytes], float], Awaitable[np.ndarray]]


@dataclass(eq=False)
class _Pending:
    images: list[bytes]
    deadline: float  # loop.time()
    future: asyncio.Future = field(repr=False)
    bulk: bool = False


class MicroBatcher:
    """Merges concurrent requests into batches of at most `max_batch` images.

    The first request of a batch waits `window_s` for company, then everything queued (up to `max_batch`
    images) goes out as one inference. A batch that fails on a bad image is split per caller and retried,
    so one caller's bad image never fails its neighbours.

    Two classes of work: interactive requests (searches) and bulk ones (`bulk=True`: catalogue ingests). Bulk work
    never delays a search by more than about `BULK_INFLIGHT_S`: only that much of it (at the measured throughput)
    is sent at a time, the rest waits here, behind every search, and searches are admitted on the work ahead of
    them, which a bulk backlog is not. Without it one bulk ingest of a few thousand photos filled the model's queue
    and every search for the next minutes was refused (or timed out) behind it.
    """

    def __init__(self, run_batch: RunBatch, *, max_batch: int, window_s: float,
                 max_inflight: int | None = None, shed_load: bool = False) -> None:
        self._run_batch = run_batch
        self._max_batch = max_batch
        self._window_s = window_s
        # With a bound, requests queue up while the model is busy and leave as one bigger batch (in-process
        # models with one worker); None suits Triton, whose own dynamic batcher does that server-side.
        self._max_inflight = max_inflight
        self._slots: asyncio.Semaphore | None = None
        self._urgent: collections.deque[_Pending] = collections.deque()
        self._bulk: collections.deque[_Pending] = collections.deque()
        self._wakeup: asyncio.Event | None = None
        self._loop_task: asyncio.Task | None = None
        self._inflight: dict[asyncio.Task, list[_Pending]] = {}  # batch tasks, with their batches
        # Load shedding (shed_load): a request is refused at once (EmbedderOverloadedError) when the images
        # queued and in flight ahead of it, at the measured throughput, take longer than its deadline. Without
        # it an overload fills the model's queue with requests that time out after being computed anyway.
        self._shed_load = shed_load
        self._queued_urgent = 0  # images submitted, not yet in a batch
        self._queued_bulk = 0
        self._rate: float | None = None  # images/s while saturated (EWMA); None until measured
        self._busy_s = 0.0
        self._done_images = 0
        self._last_event = 0.0
        self._sent: dict[int, tuple[float, int, bool]] = {}  # batches in flight: start time, images, bulk
        self._keys = itertools.count()
        self._urgent_images = 0  # images sent for searches while bulk work waited, since its last batch
        self._latencies: collections.deque[float] = collections.deque(maxlen=LATENCY_WINDOW)  # of ok batches
        self._queued_in_window = False  # a batch of the current sample window queued

    def _account(self, now: float) -> None:
        """Busy time since the last change of the in-flight count (stuck batches do not make the model busy)."""
        if self._live_inflight() > 0:
            self._busy_s += now - self._last_event
        self._last_event = now

    def _overdue(self, started: float, n: int, now: float) -> bool:
        return self._rate is not None and now - started > 2 * n / self._rate + OVERDUE_SLACK_S

    def _live_inflight(self, *, bulk_only: bool = False) -> int:
        """Images in flight in batches not yet overdue. A batch far past its expected time is stuck (a hung Triton
        pod, which the channel soon leaves out): counted as work ahead it refused searches while the other pods sat
        idle, and counted as busy time it dragged the measured throughput down to the light traffic's."""
        now = time.monotonic()
        return sum(n for started, n, bulk in self._sent.values()
                   if (bulk or not bulk_only) and not self._overdue(started, n, now))

    def _ahead(self, *, bulk: bool) -> int:
        """Images that a request submitted now waits for: the searches queued (and, for a bulk request, the bulk
        work queued too), and the images in live batches in flight."""
        return self._queued_urgent + (self._queued_bulk if bulk else 0) + self._live_inflight()

    def _bulk_budget(self) -> int:
        """Bulk images allowed in flight at once: BULK_INFLIGHT_S of the model's work, one batch until measured."""
        if self._rate is None:
            return self._max_batch
        return max(1, int(self._rate * BULK_INFLIGHT_S))

    def _bulk_batch_size(self) -> int:
        """A bulk batch: a BULK_BATCHES-th of the budget (at least one image), within the room left; the whole
        budget for a bounded model (max_inflight), which runs one batch at a time anyway."""
        budget = self._bulk_budget()
        piece = min(self._max_batch, max(1, -(-budget // (1 if self._max_inflight else BULK_BATCHES))))
        return min(piece, max(1, self._bulk_room()))

    def _bulk_room(self) -> int:
        # A batch stuck on a hung pod holds one BULK_BATCHES-th of the budget, and once the throughput is measured
        # (by the batches the other pods answer) it is overdue and holds nothing.
        return self._bulk_budget() - self._live_inflight(bulk_only=True)

    def overloaded(self, n: int, timeout_s: float, *, bulk: bool = False) -> bool:
        """Whether `n` images submitted now would be refused (no side effect)."""
        if not self._shed_load or self._rate is None:
            return False
        ahead = self._ahead(bulk=bulk)
        if ahead == 0:  # nothing ahead: always tried (how the estimate recovers)
            return False
        return (ahead + n) / self._rate > timeout_s - min(ADMIT_MARGIN_S, timeout_s / 2)

    def _admit(self, n: int, timeout_s: float, bulk: bool) -> None:
        if self.overloaded(n, timeout_s, bulk=bulk):
            ahead = self._ahead(bulk=bulk)
            wait_s = (ahead + n) / self._rate
            raise EmbedderOverloadedError(
                f"embedding overloaded: {ahead} images ahead, ~{wait_s:.3f}s at {self._rate:.1f} images/s, "
                f"deadline {timeout_s:.3f}s")

    async def submit(self, images: list[bytes], *, timeout_s: float, bulk: bool = False) -> np.ndarray:
        loop = asyncio.get_running_loop()
        if self._loop_task is None or self._loop_task.done() or self._loop_task.get_loop() is not loop:
            self._urgent.clear()
            self._bulk.clear()
            self._queued_urgent, self._queued_bulk = 0, 0  # the old loop's work is gone with it
            self._sent.clear()
            self._wakeup = asyncio.Event()
            self._slots = asyncio.Semaphore(self._max_inflight) if self._max_inflight else None
            self._loop_task = loop.create_task(self._run())
        self._admit(len(images), timeout_s, bulk)
        deadline = loop.time() + timeout_s
        # Bulk work goes out in pieces as small as the bulk budget allows (one image, on a slow CPU model), so
        # it is queued one image at a time; a search's images go out together.
        size = 1 if bulk else self._max_batch
        chunks = [images[i : i + size] for i in range(0, len(images), size)]
        pending = [_Pending(chunk, deadline, loop.create_future(), bulk) for chunk in chunks]
        (self._bulk if bulk else self._urgent).extend(pending)
        if bulk:
            self._queued_bulk += len(images)
        else:
            self._queued_urgent += len(images)
        self._wakeup.set()
        gathered = asyncio.gather(*(item.future for item in pending))
        # A caller cancelled or timed out leaves the gathered result unread; read it, or asyncio logs it as lost.
        gathered.add_done_callback(lambda done: done.cancelled() or done.exception())
        try:
            # not asyncio.wait_for: on Python 3.11 it can return a result and drop a cancel that came in the same
            # loop step (gh-86296), and a cancelled caller would go on
            async with asyncio.timeout(timeout_s):
                parts = await gathered
        except TimeoutError:
            raise EmbedderTimeoutError(f"no embedding within {timeout_s:.3f}s") from None
        finally:
            for item in pending:
                item.future.cancel()  # no-op when done; drops it from a batch not yet sent
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def _pop(self, queue: collections.deque[_Pending]) -> _Pending:
        item = queue.popleft()
        if item.bulk:
            self._queued_bulk -= len(item.images)
        else:
            self._queued_urgent -= len(item.images)
        return item

    def _drop_gone(self, queue: collections.deque[_Pending]) -> None:
        while queue and queue[0].future.done():  # callers gone or timed out: not worth a place in a batch
            self._pop(queue)

    async def _wait_for_work(self) -> None:
        while True:
            self._drop_gone(self._urgent)
            self._drop_gone(self._bulk)
            if self._urgent or (self._bulk and self._bulk_room() > 0):
                return
            self._wakeup.clear()
            # Woken by a submit or a finished batch; the timer notices a bulk batch turning overdue (stuck).
            timer = asyncio.get_running_loop().call_later(OVERDUE_SLACK_S, self._wakeup.set)
            try:
                await self._wakeup.wait()
            finally:
                timer.cancel()

    async def _next_batch(self) -> tuple[list[_Pending], bool]:
        await self._wait_for_work()
        bulk_ready = bool(self._bulk) and self._bulk_room() > 0
        share = int(self._urgent_images * BULK_SHARE / (1 - BULK_SHARE))  # bulk images owed
        bulk = bulk_ready and (not self._urgent or share >= self._bulk_batch_size())
        queue = self._bulk if bulk else self._urgent
        limit = min(self._max_batch, max(self._bulk_batch_size(), share)) if bulk else self._max_batch
        first = self._pop(queue)
        batch, size = [first], len(first.images)
        if self._window_s > 0 and size < limit:
            try:
                await asyncio.sleep(self._window_s)
            except asyncio.CancelledError:  # close() during the window: the caller is told now, not at its deadline
                _fail(first, EmbedderUnavailableError("embedder closed"))
                raise
        while queue and size < limit:
            self._drop_gone(queue)
            if not queue or size + len(queue[0].images) > limit:
                break
            item = self._pop(queue)
            batch.append(item)
            size += len(item.images)
        if bulk or not self._bulk:
            self._urgent_images = 0
        else:
            self._urgent_images += size
        return batch, bulk

    async def _run(self) -> None:
        while True:
            if self._slots is not None:
                await self._slots.acquire()
            batch, bulk = await self._next_batch()
            # Counted as in flight now, not when its task first runs: the next batch's bulk room depends on it.
            sent = self._register(batch, bulk)
            task = asyncio.get_running_loop().create_task(self._send(batch, bulk, sent))
            self._inflight[task] = batch
            task.add_done_callback(self._batch_done)

    def _register(self, batch: list[_Pending], bulk: bool) -> tuple[int, bool]:
        """Counts a batch as in flight: its key in `_sent`, and whether it is sent to a busy model."""
        # Only a busy model (this batch sent while others wait or run) measures its throughput: at light load,
        # one call at a time, the images done per busy second are the load, not the capacity, and a burst after
        # it was refused work a batching GPU would have done in milliseconds.
        saturated = self._live_inflight() > 0 or self._queued_urgent > 0 or self._queued_bulk > 0
        self._account(asyncio.get_running_loop().time())
        key = next(self._keys)
        self._sent[key] = (time.monotonic(), sum(len(item.images) for item in batch), bulk)
        return key, saturated

    def _batch_done(self, task: asyncio.Task) -> None:
        self._inflight.pop(task, None)
        if self._slots is not None:
            self._slots.release()
        if self._wakeup is not None:
            self._wakeup.set()  # bulk room freed

    async def _send(self, batch: list[_Pending], bulk: bool, sent: tuple[int, bool] | None = None) -> None:
        loop = asyncio.get_running_loop()
        if sent is None:
            sent = self._register(batch, bulk)
        key, saturated = sent
        batch = [item for item in batch if not item.future.done()]  # caller gone or timed out
        timeout_s = max((item.deadline for item in batch), default=0) - loop.time()
        if timeout_s <= 0:  # nobody left, or every caller's own timeout fires
            self._sent.pop(key, None)
            self._account(loop.time())
            return
        images = [data for item in batch for data in item.images]
        outcome = "error"
        try:
            embeddings = await self._run_batch(images, timeout_s)
            outcome = "ok"
        except (InvalidImageError, ImageTooLargeError) as exc:  # one caller's image: never fail the others
            if len(batch) == 1:
                _fail(batch[0], exc)
            else:  # find the culprit: each caller on its own
                await asyncio.gather(*(self._send([item], bulk) for item in batch))
            return
        except asyncio.CancelledError:  # close(): nobody will answer these callers any more
            for item in batch:
                _fail(item, EmbedderUnavailableError("embedder closed"))
            raise
        except Exception as exc:  # noqa: BLE001 - handed to the callers, who raise it
            if isinstance(exc, EmbedderTimeoutError):
                outcome = "timeout"
            for item in batch:
                _fail(item, exc)
            return
        finally:
            now = loop.time()
            self._account(now)  # the busy time up to now, this batch still in flight: the last one's counts too
            started, _, _ = self._sent.pop(key, (time.monotonic(), 0, bulk))
            took_s = time.monotonic() - started
            if outcome == "ok":
                if self._latencies and took_s > 2 * min(self._latencies) + QUEUE_SLACK_S:
                    self._queued_in_window = True
                self._latencies.append(took_s)
            if not saturated or self._overdue(started, len(images), time.monotonic()):
                outcome = "unsaturated"  # its time says nothing of the model's capacity
            self._finished(now, len(images), outcome)
        start = 0
        for item in batch:
            part = embeddings[start : start + len(item.images)]
            start += len(item.images)
            if not item.future.done():
                item.future.set_result(part)

    def _finished(self, now: float, n: int, outcome: str) -> None:
        self._last_event = now
        if outcome == "ok":
            self._done_images += n
        elif outcome in ("error", "unsaturated"):  # a fast failure (model down, bad image), or a light load,
            self._busy_s, self._done_images, self._queued_in_window = 0.0, 0, False  # says nothing of the capacity
        if self._busy_s >= RATE_WINDOW_S:
            sample = self._done_images / self._busy_s
            if self._rate is not None and sample > self._rate:  # more than estimated was done: it can do that
                self._rate = (1 - RATE_SMOOTHING) * self._rate + RATE_SMOOTHING * sample
            elif self._queued_in_window:  # the model queued: the sample is its capacity, not the traffic's rate
                self._rate = sample if self._rate is None else (
                    (1 - RATE_SMOOTHING) * self._rate + RATE_SMOOTHING * sample)
            self._busy_s, self._done_images, self._queued_in_window = 0.0, 0, False

    async def close(self) -> None:
        batches = list(self._inflight.values())  # a task cancelled before its first step never fails its callers
        tasks = [t for t in (self._loop_task, *self._inflight) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._loop_task = None
        for item in (item for batch in batches for item in batch):
            _fail(item, EmbedderUnavailableError("embedder closed"))
        self._sent.clear()
        for queue in (self._urgent, self._bulk):
            while queue:
                _fail(self._pop(queue), EmbedderUnavailableError("embedder closed"))


def _fail(item: _Pending, exc: BaseException) -> None:
    if not item.future.done():
        item.future.set_exception(exc)


def _check_output(embeddings: np.ndarray, n: int) -> np.ndarray:
    if embeddings is None or embeddings.shape != (n, EMBEDDING_DIM):
        shape = None if embeddings is None else embeddings.shape
        raise EmbedderError(f"model returned embeddings of shape {shape}, expected ({n}, {EMBEDDING_DIM})")
    return np.ascontiguousarray(embeddings, dtype=np.float32)


# Round robin over the Triton pods, leaving out for a while a pod that fails nearly every call (grpc's outlier
# detection): a hung or partitioned pod whose connection stays open (HTTP/2 keepalive does not drop it: the
# kernel still accepts the reconnection) otherwise got 1/N of all embedding calls, each waiting out its whole
# deadline. The threshold is high because uniform failures (an overload) would eject healthy pods too; at most
# half of them are ever left out, and never the only one.
TRITON_SERVICE_CONFIG = {"loadBalancingConfig": [{"outlier_detection_experimental": {
    "interval": "1s",
    "baseEjectionTime": "10s",
    "maxEjectionTime": "120s",
    # gRPC compares the share already left out before each ejection (0 < 33, then 33 < 33 stops with 3 pods):
    # at most half of the pods, rounded down. 50 left 2 of 3 pods out.
    "maxEjectionPercent": 33,
    "failurePercentageEjection": {"threshold": 90, "enforcementPercentage": 100, "minimumHosts": 2,
                                  "requestVolume": 3},
    "childPolicy": [{"round_robin": {}}],
}}]}

# tritonclient's own channel settings (unlimited messages, its keepalive defaults, which Triton's ping policy
# accepts), plus:
TRITON_CHANNEL_ARGS = [
    ("grpc.max_send_message_length", 2**31 - 1),
    ("grpc.max_receive_message_length", 2**31 - 1),
    ("grpc.keepalive_time_ms", 2**31 - 1),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", 0),
    ("grpc.http2.max_pings_without_data", 2),
    # A new or restarted Triton pod is found when the name is resolved again, by default at most every 30 s.
    ("grpc.dns_min_time_between_resolutions_ms", 1_000),
    # Requests spread over every address the URL resolves to (round_robin): with `dns:///<headless service>:8001`
    # (deploy/), over every Triton pod, where a ClusterIP Service pins each broker's one connection to one pod.
    ("grpc.service_config", json.dumps(TRITON_SERVICE_CONFIG)),
    # A Triton pod back after a restart is tried again within a second (grpc's backoff otherwise grows to 120 s).
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.min_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", 1_000),
]


class TritonEmbedder(Embedder):
    """Embeddings from a Triton Inference Server hosting the `imgsearch` ensemble (bytes in)."""

    def __init__(
        self,
        url: str,
        *,
        model_name: str = "imgsearch",
        max_batch: int = DEFAULT_MAX_BATCH,
        batch_window_s: float = DEFAULT_BATCH_WINDOW_S,
        max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
        ssl: bool = False,
        root_certificates: str | None = None,
    ) -> None:
        self.url = url
        self.model_name = model_name
        self.max_image_bytes = max_image_bytes
        self._ssl = ssl
        self._root_certificates = root_certificates
        self._client = None
        self._model_max_batch: int | None = None  # the served model's max_batch_size, read from Triton
        self._batcher = MicroBatcher(self._infer, max_batch=max_batch, window_s=batch_window_s, shed_load=True)

    def _grpc_client(self):
        # Created inside the running loop: grpc.aio channels belong to the loop that made them.
        if self._client is None:
            import tritonclient.grpc.aio as grpcclient

            self._client = grpcclient.InferenceServerClient(
                self.url, ssl=self._ssl, root_certificates=self._root_certificates, channel_args=TRITON_CHANNEL_ARGS
            )
        return self._client

    async def embed(self, images: Sequence[bytes], *, timeout_s: float, bulk: bool = False) -> np.ndarray:
        images = [bytes(data) for data in images]
        check_sizes(images, max_image_bytes=self.max_image_bytes)
        if not images:
            return np.zeros((0, EMBEDDING_DIM), dtype=np.float32)
        return await self._batcher.submit(images, timeout_s=timeout_s, bulk=bulk)

    async def _infer(self, images: list[bytes], timeout_s: float) -> np.ndarray:
        # The broker's batch size and the model's max_batch_size are configured in two places; Triton refuses
        # a bigger batch outright, so a batch over the model's limit goes out in parts. A model reloaded with a
        # smaller limit than the one read refuses the batch: the limit is read again and the batch sent again in
        # parts, once (its callers failed with INTERNAL, review of 2026-12-06).
        deadline = time.monotonic() + timeout_s
        limit = await self._model_batch_limit(max(deadline - time.monotonic(), 0.001))
        try:
            return await self._infer_in_parts(images, limit, deadline)
        except EmbedderUnavailableError as refused:
            if self._model_max_batch is not None or "batch-size must be" not in str(refused):
                raise
            # Sent again only in parts of a limit read anew, in the time left (else the refusal, or the deadline,
            # is the answer: the whole batch again would be refused again).
            remaining_s = deadline - time.monotonic()
            if remaining_s <= 0:
                raise EmbedderTimeoutError(f"no time left to send the batch again in parts: {refused}") from None
            limit = await self._model_batch_limit(remaining_s)
            if limit is None:  # could not be read: the whole batch would be refused again
                if deadline - time.monotonic() <= 0:
                    raise EmbedderTimeoutError(f"no time left to send the batch again in parts: {refused}") from None
                raise
            if deadline - time.monotonic() <= 0:
                raise EmbedderTimeoutError(f"no time left to send the batch again in parts: {refused}") from None
            return await self._infer_in_parts(images, limit, deadline)

    async def _infer_in_parts(self, images: list[bytes], limit: int | None, deadline: float) -> np.ndarray:
        remaining_s = max(deadline - time.monotonic(), 0.001)
        if limit is None or len(images) <= limit:
            return await self._infer_once(images, remaining_s)
        parts = await asyncio.gather(*(self._infer_once(images[i : i + limit], remaining_s)
                                       for i in range(0, len(images), limit)))
        return np.concatenate(parts)

    async def _model_batch_limit(self, timeout_s: float) -> int | None:
        """The served model's max_batch_size (None when Triton cannot say; the inference then reports why)."""
        if self._model_max_batch is None:
            from tritonclient.utils import InferenceServerException

            try:
                answer = await self._grpc_client().get_model_config(self.model_name, as_json=True,
                                                                    client_timeout=timeout_s)
                self._model_max_batch = int(answer["config"].get("max_batch_size", 0))
            except (InferenceServerException, KeyError, TypeError, ValueError):
                return None
        return self._model_max_batch if self._model_max_batch > 0 else None

    async def _infer_once(self, images: list[bytes], timeout_s: float) -> np.ndarray:
        import tritonclient.grpc.aio as grpcclient
        from tritonclient.utils import InferenceServerException

        encoded = np.empty((len(images), 1), dtype=np.object_)
        encoded[:, 0] = images
        image_input = grpcclient.InferInput("image", list(encoded.shape), "BYTES")
        image_input.set_data_from_numpy(encoded)
        try:
            result = await self._grpc_client().infer(
                self.model_name, [image_input], outputs=[grpcclient.InferRequestedOutput(OUTPUT_NAME)],
                client_timeout=timeout_s,
                # Server-side queue timeout (µs), forwarded by the ensemble to every step: a request whose caller
                # is gone is dropped from the preprocessing queue (gRPC cancellation only reaches later steps).
                timeout=max(1, int(timeout_s * 1e6)),
            )
        except InferenceServerException as exc:
            if "batch-size must be" in str(exc.message() if hasattr(exc, "message") else exc):
                self._model_max_batch = None  # the model was reloaded with a smaller limit: read it again
            raise triton_error(exc) from None
        return _check_output(result.as_numpy(OUTPUT_NAME), len(images))

    async def ready(self, *, timeout_s: float) -> bool:
        try:
            client = self._grpc_client()
            deadline = time.monotonic() + timeout_s
            if not await client.is_server_ready(client_timeout=timeout_s):
                return False
            remaining = max(deadline - time.monotonic(), 0.001)
            return bool(await client.is_model_ready(self.model_name, client_timeout=remaining))
        except Exception:  # noqa: BLE001 - not ready is the answer, whatever the reason
            return False

    async def close(self) -> None:
        await self._batcher.close()
        if self._client is not None:
            client, self._client = self._client, None
            with contextlib.suppress(Exception):
                await client.close()


def triton_error(exc: Exception) -> EmbedderError:
    """Map a tritonclient error (status is the gRPC code's str, e.g. 'StatusCode.UNAVAILABLE')."""
    status = str(exc.status() if hasattr(exc, "status") else "")
    message = exc.message() if hasattr(exc, "message") else str(exc)
    if "ImageTooLargeError" in message:
        return ImageTooLargeError(message)
    if "InvalidImageError" in message:
        return InvalidImageError(message)
    if status.endswith("DEADLINE_EXCEEDED") or "timeout expired" in message:  # the queue policy's rejection
        return EmbedderTimeoutError(f"Triton deadline exceeded: {message}")
    # "Stub process ... is not healthy": a python-backend process of the model died (OOM-killed, say), and every
    # call fails until Triton restarts (its liveness probe runs an inference: embedder/triton_probe.py); INTERNAL
    # said it was our fault, and no replica was tried. "batch-size must be": the model was reloaded with a smaller
    # max_batch_size than this client read (TritonEmbedder._infer retries in parts once).
    if status.endswith(("UNAVAILABLE", "NOT_FOUND", "CANCELLED")) or "unknown model" in message \
            or "is not ready" in message or "is not healthy" in message or "batch-size must be" in message:
        return EmbedderUnavailableError(f"Triton unavailable ({status}): {message}")
    return EmbedderError(f"Triton error ({status}): {message}")


class OnnxEmbedder(Embedder):
    """Embeddings computed in this process with ONNX Runtime (decoding in the same worker thread)."""

    def __init__(
        self,
        model_path: str | Path | None = None,
        *,
        max_batch: int = DEFAULT_MAX_BATCH,
        batch_window_s: float = DEFAULT_BATCH_WINDOW_S,
        max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
        intra_op_threads: int = 0,
        allow_spinning: bool = False,
        workers: int = 1,
    ) -> None:
        import onnxruntime as ort

        self.model_path = Path(model_path) if model_path else default_model_path()
        if not self.model_path.is_file():
            raise EmbedderUnavailableError(f"ONNX model not found: {self.model_path}")
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = 1
        # Spin-waiting threads waste a small shared box's cores (see embedder.triton_repo.RepositoryOptions).
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if allow_spinning else "0")
        self._session = ort.InferenceSession(str(self.model_path), options, providers=["CPUExecutionProvider"])
        self.max_image_bytes = max_image_bytes
        self._limits = {"max_image_bytes": max_image_bytes, "max_image_pixels": max_image_pixels}
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="onnx-embedder")
        self._batcher = MicroBatcher(self._infer, max_batch=max_batch, window_s=batch_window_s,
                                     max_inflight=workers)

    def embed_sync(self, images: Sequence[bytes]) -> np.ndarray:
        """Decode, preprocess and run one batch in the calling thread."""
        pixels = np.stack([preprocess_bytes(bytes(data), **self._limits) for data in images])
        return _check_output(self._session.run([OUTPUT_NAME], {INPUT_NAME: pixels})[0], len(images))

    async def embed(self, images: Sequence[bytes], *, timeout_s: float, bulk: bool = False) -> np.ndarray:
        images = [bytes(data) for data in images]
        check_sizes(images, max_image_bytes=self.max_image_bytes)
        if not images:
            return np.zeros((0, EMBEDDING_DIM), dtype=np.float32)
        return await self._batcher.submit(images, timeout_s=timeout_s, bulk=bulk)

    async def _infer(self, images: list[bytes], timeout_s: float) -> np.ndarray:
        # The timeout is enforced by the batcher; a started ONNX run cannot be interrupted anyway.
        return await asyncio.get_running_loop().run_in_executor(self._executor, self.embed_sync, images)

    async def ready(self, *, timeout_s: float) -> bool:
        return self._session is not None

    async def close(self) -> None:
        await self._batcher.close()
        self._executor.shutdown(wait=False, cancel_futures=True)


__all__ = [
    "Embedder",
    "MicroBatcher",
    "OnnxEmbedder",
    "TritonEmbedder",
    "check_sizes",
    "triton_error",
]
