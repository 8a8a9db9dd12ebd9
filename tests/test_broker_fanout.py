"""ShardPool's writes and replica calls, and the cache repair queue, with stand-ins for the shard clients and
Redis (unit tests of one module each; the real processes are in test_broker_consistency.py)."""
import asyncio
import time

import numpy as np
import pytest

from broker.fanout import ShardPool
from broker.idlocks import ImageIdLocks
from broker.repair import CacheRepairQueue
from broker.routing import ShardMap
from imgsearch.errors import DeadlineExceededError, UnavailableError
from shard_server.types import Record, SearchQuery, SearchResult

DIM = 8


class FakeShard:
    def __init__(self, *, down=False, delete_s=0.0):
        self.down, self.delete_s, self.deletes = down, delete_s, []

    async def upsert(self, records, *, timeout_s):
        if self.down:
            raise UnavailableError("connection refused")
        return len(records)

    async def delete(self, image_ids, *, timeout_s, version=0):
        if self.down:
            raise UnavailableError("connection refused")
        if self.delete_s > timeout_s:
            await asyncio.sleep(timeout_s)
            raise DeadlineExceededError("deadline")
        await asyncio.sleep(self.delete_s)
        self.deletes.append(list(image_ids))
        return 0

    async def close(self):
        pass


def _pool(monkeypatch, clients, shards, categories):
    monkeypatch.setattr("broker.fanout.ShardClient", lambda address, **_: clients[address])
    return ShardPool(ShardMap(shards=shards, categories=categories))


def _rec(image_id, category):
    return Record(image_id=image_id, product_id="p", category=category, vector=np.ones(DIM, np.float32))


async def test_one_replica_of_an_uninvolved_shard_down_does_not_fail_an_ingest(monkeypatch):
    """s0 owns 'a'; s1 has two replicas, one down (a rolling restart). A new id ingested into 'a' moved nothing
    off s1: the stale-copy removal, sent for every id to every other shard, removed nothing on the replica that
    answered, so the replicas cannot differ and the ingest succeeds."""
    clients = {"h:0": FakeShard(), "h:1": FakeShard(), "h:2": FakeShard(down=True)}
    pool = _pool(monkeypatch, clients, {"s0": ("h:0",), "s1": ("h:1", "h:2")}, {"a": "s0", "b": "s1"})
    assert await pool.upsert([_rec("brand-new", "a")], timeout_s=5) == 1


async def test_every_replica_of_an_uninvolved_shard_down_does_not_fail_an_ingest(monkeypatch):
    """With every s1 replica down the removal is best effort (counted), as with one."""
    clients = {"h:0": FakeShard(), "h:1": FakeShard(down=True), "h:2": FakeShard(down=True)}
    pool = _pool(monkeypatch, clients, {"s0": ("h:0",), "s1": ("h:1", "h:2")}, {"a": "s0", "b": "s1"})
    assert await pool.upsert([_rec("brand-new", "a")], timeout_s=5) == 1


async def test_a_slow_replica_of_an_uninvolved_shard_does_not_fail_an_ingest(monkeypatch):
    """One s1 replica answers its Delete in 0.6 s (busy), over STALE_COPY_REMOVAL_MAX_S: the other removed
    nothing, so the ingest of a new id into s0's category succeeds."""
    clients = {"h:0": FakeShard(), "h:1": FakeShard(), "h:2": FakeShard(delete_s=0.6)}
    pool = _pool(monkeypatch, clients, {"s0": ("h:0",), "s1": ("h:1", "h:2")}, {"a": "s0", "b": "s1"})
    assert await pool.upsert([_rec("brand-new-2", "a")], timeout_s=5) == 1


class SlowSearcher:
    """A healthy replica that answers in `took` seconds, within the caller's deadline."""

    def __init__(self, took):
        self.took, self.budgets = took, []

    async def call(self, timeout_s):
        self.budgets.append(timeout_s)
        if self.took > timeout_s:
            await asyncio.sleep(timeout_s)
            raise DeadlineExceededError("deadline")
        await asyncio.sleep(self.took)
        return "answer"


async def test_a_loaded_replica_answering_in_60_percent_of_the_deadline_is_not_cut_off(monkeypatch):
    """A replica gets most of what is left (a quarter is kept for the next, in case it hangs): a healthy
    replica answering in 0.3 s of a 0.5 s deadline must answer, not be cut off and the search sent again."""
    clients = {"h:1": FakeShard(), "h:2": FakeShard()}
    pool = _pool(monkeypatch, clients, {"s1": ("h:1", "h:2")}, {"b": "s1"})
    r1, r2 = SlowSearcher(0.3), SlowSearcher(0.3)
    reply = await pool._ask_replicas("s1", lambda c, t: c.call(t), time.monotonic() + 0.5, [r1, r2])
    assert reply.outcome == "ok", (reply.outcome, r1.budgets, r2.budgets)


class FakeCache:
    def __init__(self):
        self.calls = []
        self.gate = asyncio.Event()

    async def delete(self, image_id):
        self.calls.append(("delete", image_id))
        if image_id == "first":
            await self.gate.wait()  # Redis slow on the first pending write

    async def upsert(self, entry):
        self.calls.append(("upsert", entry))


async def test_a_pending_delete_superseded_during_a_repair_round_is_skipped():
    """Pending: delete 'first', delete 'x' (Redis was down). While the round waits on 'first', a newer ingest of
    'x' writes its cache entry and discards the pending delete: the round must skip 'x' (a pending delete is
    None, so "no pending write" needs its own sentinel), not delete the fresh entry nor fail on it."""
    cache = FakeCache()
    queue = CacheRepairQueue(cache, interval_s=3600)
    queue.add("first", None)
    queue.add("x", None)
    round_ = asyncio.create_task(queue.repair_once())
    await asyncio.sleep(0.01)
    queue.discard("x")  # a newer successful write (the ingest's cache upsert) made it obsolete
    cache.gate.set()
    await round_
    assert ("delete", "x") not in cache.calls, cache.calls


async def test_the_repair_queue_keeps_at_most_its_cap_and_counts_the_rest(monkeypatch):
    """Every failed cache write kept its entry (the 512-d embedding: ~2.7 KB) with no limit: re-ingesting a large
    catalogue during a Redis outage grew the broker by GBs (an ingest review measured 400 MB at 120k images)."""
    from prometheus_client import REGISTRY

    monkeypatch.setattr("broker.repair.MAX_PENDING_WRITES", 3)

    def dropped():
        return REGISTRY.get_sample_value("imgsearch_broker_cache_repair_dropped_total") or 0

    before = dropped()
    queue = CacheRepairQueue(FakeCache(), interval_s=3600)
    for i in range(5):
        queue.add(f"id-{i}", None)
    queue.add("id-0", None)  # an id already pending is replaced, not dropped
    assert len(queue) == 3 and dropped() - before == 2


async def test_image_id_locks_order_writers_time_out_and_leave_nothing_behind():
    """broker.idlocks: a second writer of an id waits for the first; one that waits past its deadline gets
    DEADLINE_EXCEEDED; overlapping id sets in any order do not deadlock; no lock outlives its holders."""
    locks, order = ImageIdLocks(), []

    async def write(ids, name, hold_s, timeout_s=5.0):
        async with locks.hold(ids, timeout_s=timeout_s):
            order.append(f"{name} in")
            await asyncio.sleep(hold_s)
            order.append(f"{name} out")

    first = asyncio.create_task(write(["x", "y"], "first", 0.2))
    await asyncio.sleep(0.01)
    await asyncio.gather(write(["y", "x"], "second", 0), write(["z"], "other", 0))
    await first
    assert order.index("first out") < order.index("second in")
    assert order.index("other out") < order.index("first out")  # an unrelated id does not wait

    blocker = asyncio.create_task(write(["x"], "blocker", 0.5))
    await asyncio.sleep(0.01)
    with pytest.raises(DeadlineExceededError):
        await write(["x"], "late", 0, timeout_s=0.05)
    await blocker
    assert len(locks) == 0


class HoldingShard(FakeShard):
    """A replica that holds some ids: its (versioned) delete removes them and says how many."""

    def __init__(self, held=(), **kwargs):
        super().__init__(**kwargs)
        self.held = set(held)

    async def delete(self, image_ids, *, timeout_s, version=0):
        if self.down:
            raise UnavailableError("connection refused")
        removed = self.held & set(image_ids)
        self.held -= removed
        self.deletes.append((list(image_ids), version))
        return len(removed)


def _versioned(image_id, category, version):
    return Record(image_id=image_id, product_id="p", category=category, vector=np.ones(DIM, np.float32),
                  version=version)


async def test_removals_are_kept_for_a_down_replica_only_when_something_moved_off_its_shard(monkeypatch):
    """Every ingest sends its ids to every other shard. With one s1 replica down, a new id (the other replica
    removes nothing) must not be kept for it, or the pending removals grow with every ingest of the outage; an
    id that did move off s1 (the other replica removed it) must, and is sent once the replica is back."""
    down = HoldingShard(held={"moved"}, down=True)
    clients = {"h:0": HoldingShard(), "h:1": HoldingShard(held={"moved"}), "h:2": down}
    pool = _pool(monkeypatch, clients, {"s0": ("h:0",), "s1": ("h:1", "h:2")}, {"a": "s0", "b": "s1"})
    for i in range(20):
        await pool.upsert([_versioned(f"new-{i}", "a", 100 + i)], timeout_s=5)
    assert len(pool.removal_hints) == 0
    with pytest.raises(UnavailableError):  # replicas of s1 now differ: the caller is told
        await pool.upsert([_versioned("moved", "a", 200)], timeout_s=5)
    assert len(pool.removal_hints) == 1
    down.down = False
    assert await pool.removal_hints.retry_once() == 1
    assert down.held == set() and down.deletes[-1] == (["moved"], 200)
    await pool.close()


async def test_every_replica_down_keeps_the_removals_up_to_a_cap(monkeypatch):
    """Nobody can say what moved off a shard whose replicas are all down: the removals are kept, at most
    MAX_PENDING_IDS of them (the rest dropped and counted), and sent once more on a graceful stop."""
    monkeypatch.setattr("broker.removal_hints.MAX_PENDING_IDS", 5)
    down = HoldingShard(down=True)
    clients = {"h:0": HoldingShard(), "h:1": down}
    pool = _pool(monkeypatch, clients, {"s0": ("h:0",), "s1": ("h:1",)}, {"a": "s0", "b": "s1"})
    for i in range(8):
        await pool.upsert([_versioned(f"id-{i}", "a", 300 + i)], timeout_s=5)
    assert len(pool.removal_hints) == 5
    down.down = False
    await pool.close()  # the flush on stop
    assert len(pool.removal_hints) == 0 and len(down.deletes) == 5


async def test_a_write_out_of_time_on_a_replica_is_deadline_exceeded_not_unavailable(monkeypatch):
    class SlowWriter(FakeShard):
        async def upsert(self, records, *, timeout_s):
            await asyncio.sleep(timeout_s)
            raise DeadlineExceededError("deadline")

    clients = {"h:0": FakeShard(), "h:1": SlowWriter()}
    pool = _pool(monkeypatch, clients, {"s0": ("h:0", "h:1")}, {"a": "s0"})
    with pytest.raises(DeadlineExceededError):
        await pool.upsert([_rec("late", "a")], timeout_s=0.1)


class SearchingShard(FakeShard):
    """A replica that answers a search in `answer_s`, or never (hung: stopped, swapping)."""

    def __init__(self, *, hung=False, answer_s=0.0):
        super().__init__()
        self.hung, self.answer_s, self.searches = hung, answer_s, 0

    async def search(self, query, *, timeout_s):
        self.searches += 1
        if self.hung or self.answer_s > timeout_s:
            await asyncio.sleep(timeout_s)
            raise DeadlineExceededError("deadline")
        await asyncio.sleep(self.answer_s)
        return SearchResult(hits=())


async def test_a_hung_replica_is_asked_last_after_it_ran_out_of_time(monkeypatch):
    """Round-robin sent every other search to a hung replica first, where it spent three quarters of its deadline
    (a stress review: 1,100 searches in 5 s fell to 123 with one of two replicas stopped). After one timeout it is
    asked last for SLOW_REPLICA_LAST_S; then it gets its turn again."""
    monkeypatch.setattr("broker.fanout.SLOW_REPLICA_LAST_S", 0.5, raising=False)
    hung, healthy = SearchingShard(hung=True), SearchingShard()
    pool = _pool(monkeypatch, {"h:0": hung, "h:1": healthy}, {"s0": ("h:0", "h:1")}, {"a": "s0"})
    query = SearchQuery(vector=np.ones(DIM, np.float32), top_k=1)
    started = time.monotonic()
    for _ in range(20):
        assert not (await pool.search(query, timeout_s=0.2)).partial
    assert hung.searches == 1 and time.monotonic() - started < 1.0  # 20 x 0.15 s before
    await asyncio.sleep(0.6)
    for _ in range(2):
        await pool.search(query, timeout_s=0.2)
    assert hung.searches == 2  # its turn again once the penalty is over, and then asked last again
    await pool.close()


async def test_a_loaded_replica_that_ran_out_of_what_a_hung_one_left_is_not_asked_last_too(monkeypatch):
    """The healthy replica, asked second with a quarter of the deadline, timed out too (busy): it was marked as
    well, both were asked last, and round-robin was back (a review: 10 of 20 searches failed). Only a replica
    that timed out while another could still be tried is marked."""
    hung, loaded = SearchingShard(hung=True), SearchingShard(answer_s=0.12)
    pool = _pool(monkeypatch, {"h:0": hung, "h:1": loaded}, {"s0": ("h:0", "h:1")}, {"a": "s0"})
    query = SearchQuery(vector=np.ones(DIM, np.float32), top_k=1)
    answers = [await pool.search(query, timeout_s=0.4) for _ in range(20)]
    assert sum(a.partial for a in answers) <= 2 and hung.searches <= 3
    await pool.close()


async def test_a_replica_that_refuses_as_unavailable_is_asked_last_for_a_while(monkeypatch):
    """A replica loading its snapshot answers UNAVAILABLE: round-robin sent it every other search for the whole
    load, each a refusal counted on the shard and retried on its sibling, paging ImgsearchErrorRatioHigh after
    5 minutes (deploy review of 2026-12-05). It is asked last for UNAVAILABLE_REPLICA_LAST_S, then again."""
    monkeypatch.setattr("broker.fanout.UNAVAILABLE_REPLICA_LAST_S", 0.5, raising=False)

    class LoadingShard(SearchingShard):
        async def search(self, query, *, timeout_s):
            self.searches += 1
            raise UnavailableError("shard is loading")

    loading, healthy = LoadingShard(), SearchingShard()
    pool = _pool(monkeypatch, {"h:0": loading, "h:1": healthy}, {"s0": ("h:0", "h:1")}, {"a": "s0"})
    query = SearchQuery(vector=np.ones(DIM, np.float32), top_k=1)
    for _ in range(20):
        assert not (await pool.search(query, timeout_s=1)).partial
    assert loading.searches == 1 and healthy.searches == 20
    await asyncio.sleep(0.6)
    for _ in range(2):
        await pool.search(query, timeout_s=1)
    assert loading.searches == 2  # its turn again once the penalty is over
    await pool.close()


async def test_a_replica_that_keeps_failing_is_asked_last_for_longer_each_time(monkeypatch):
    """A replica hung for good cost one search in 2 s three quarters of its deadline (3.75 s of a 5 s search:
    journey review of 2026-12-05). Each failure in a row doubles its time at the back, up to MAX_REPLICA_LAST_S;
    an answer resets it."""
    monkeypatch.setattr("broker.fanout.SLOW_REPLICA_LAST_S", 0.5, raising=False)
    hung, healthy = SearchingShard(hung=True), SearchingShard()
    pool = _pool(monkeypatch, {"h:0": hung, "h:1": healthy}, {"s0": ("h:0", "h:1")}, {"a": "s0"})
    query = SearchQuery(vector=np.ones(DIM, np.float32), top_k=1)

    async def search_twice():  # round-robin: one of the two starts at the hung replica unless it is asked last
        for _ in range(2):
            assert not (await pool.search(query, timeout_s=0.2)).partial

    await search_twice()
    assert hung.searches == 1  # then asked last for 0.5 s
    await asyncio.sleep(0.8)
    await search_twice()
    assert hung.searches == 2  # its second failure in a row: 1 s
    await asyncio.sleep(0.3)
    await search_twice()
    assert hung.searches == 2
    await asyncio.sleep(1.0)
    await search_twice()
    assert hung.searches == 3  # third: 2 s
    hung.hung = False  # it answers again: its count starts over
    await asyncio.sleep(2.3)
    await search_twice()
    assert pool._strikes.get("h:0") is None
    await pool.close()


async def test_a_delete_that_fails_on_a_down_shard_answers_once_the_other_shards_have_deleted(monkeypatch):
    """s1 is down (refused at once), s0 takes 0.2 s: the caller's UNAVAILABLE comes once s0's delete has landed,
    as the docs promise ("removed the ids from the shards it reached"), and inside the caller's id locks. A gather
    that raised at the first failure answered while s0's delete was still in flight (a search right after the
    error found the image, review of 2026-12-06)."""
    slow = FakeShard(delete_s=0.2)
    clients = {"h:0": slow, "h:1": FakeShard(down=True)}
    pool = _pool(monkeypatch, clients, {"s0": ("h:0",), "s1": ("h:1",)}, {"a": "s0", "b": "s1"})
    with pytest.raises(UnavailableError):
        await pool.delete(["gone"], timeout_s=5)
    assert slow.deletes == [["gone"]]


async def test_a_write_across_shards_that_fails_on_one_answers_once_the_others_have_written(monkeypatch):
    """The same for an ingest whose records go to two shards: the error comes after the other shard's write."""
    class SlowWriter(FakeShard):
        def __init__(self):
            super().__init__()
            self.written = []

        async def upsert(self, records, *, timeout_s, validate_only=False):
            if not validate_only:
                await asyncio.sleep(0.2)
                self.written.extend(r.image_id for r in records)
            return len(records)

    class FailingWriter(FakeShard):
        async def upsert(self, records, *, timeout_s, validate_only=False):
            if validate_only:
                return len(records)
            raise UnavailableError("connection reset")

    slow = SlowWriter()
    clients = {"h:0": slow, "h:1": FailingWriter()}
    pool = _pool(monkeypatch, clients, {"s0": ("h:0",), "s1": ("h:1",)}, {"a": "s0", "b": "s1"})
    with pytest.raises(UnavailableError):
        await pool.upsert([_rec("x", "a"), _rec("y", "b")], timeout_s=5)
    assert slow.written == ["x"]


async def test_a_record_refused_by_one_shard_is_answered_at_once_while_another_validates_slowly(monkeypatch):
    """Validation writes nothing: a refusal answers at once (waiting for every shard turned INVALID_ARGUMENT into
    the caller's DEADLINE_EXCEEDED when another shard was slow; review of 2026-12-06)."""
    from imgsearch.errors import InvalidArgumentError

    class Refusing(FakeShard):
        async def upsert(self, records, *, timeout_s, validate_only=False):
            raise InvalidArgumentError("record 'x': unknown attribute 'size'")

    class Hung(FakeShard):
        async def upsert(self, records, *, timeout_s, validate_only=False):
            await asyncio.sleep(timeout_s)
            raise DeadlineExceededError("deadline")

    clients = {"h:0": Refusing(), "h:1": Hung()}
    pool = _pool(monkeypatch, clients, {"s0": ("h:0",), "s1": ("h:1",)}, {"a": "s0", "b": "s1"})
    started = time.monotonic()
    with pytest.raises(InvalidArgumentError):
        await pool.upsert([_rec("x", "a"), _rec("y", "b")], timeout_s=3)
    assert time.monotonic() - started < 1.0
