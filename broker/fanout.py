"""Shard replicas, fan-out of a search to the owning shards, writes to every replica, and the k-way merge.

Searches spread over a shard's replicas round-robin and move to the next replica on UNAVAILABLE while the
caller's deadline allows. A shard that cannot answer yields a failed :class:`ShardAnswer` (the search goes on
with the others and is flagged partial), except for INVALID_ARGUMENT and RESOURCE_EXHAUSTED, which are the
caller's fault (for example an unknown filter field, a request over a size limit) and fail the whole call.

Writes go to every replica of the owning shard (replicas hold the same data) and succeed only when every
replica made them durable; a failed write is safe to retry because upserts and deletes are idempotent.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from broker.coalesce import SearchCoalescer
from broker.errors import NoShardAvailableError, ShardTimeoutError, UnknownImageError
from broker.hint_journal import HintJournal
from broker.merge import merge_top_k
from broker.metrics import PARTIAL_RESULTS, SHARD_REQUESTS, STALE_COPY_REMOVALS_FAILED
from broker.removal_hints import RemovalHints
from broker.routing import ShardMap
from imgsearch.errors import (
    DeadlineExceededError,
    ImgsearchError,
    InvalidArgumentError,
    ResourceExhaustedError,
    UnavailableError,
)
from imgsearch.serving import channel_credentials
from shard_server.client import ShardClient
from shard_server.types import Hit, Record, SearchQuery, ShardStats

# Time kept back from the caller's deadline for merging and answering.
RESPONSE_MARGIN_S = 0.005
# Ids per shard Delete call: a broker Delete of any length is split, well under a shard's request limit
# (max_records_per_request, 10,000 by default).
DELETE_BATCH_IDS = 1_000
# How long a Get (a search by image id) waits for the other shards once one returned the image, for a newer copy.
GET_NEWER_COPY_WAIT_S = 0.05
# A replica that ran out of a search's time is asked last for this long (its shard's other replicas first).
SLOW_REPLICA_LAST_S = 2.0
# ... and one that answered UNAVAILABLE (loading its snapshot after a restart, shutting down, unreachable) for this
# long: round-robin sent it every other search for the whole of a load, each one a refusal and a retry on its
# sibling, which users never saw but which paged ImgsearchErrorRatioHigh for a load of over 5 minutes (review).
UNAVAILABLE_REPLICA_LAST_S = 5.0
# Each failure in a row doubles those times, up to this: a replica hung for good cost one search in 2 s three
# quarters of its deadline (3.75 s of a 5 s search: journey review of 2026-12-05), now one in a minute.
MAX_REPLICA_LAST_S = 60.0
# Of what is left of a deadline, the share a replica gets when another could still be tried after it.
REPLICA_SHARE_OF_DEADLINE = 0.75
# Longest an ingest waits for the best-effort removal of re-ingested ids from the shards that do not own them.
STALE_COPY_REMOVAL_MAX_S = 0.5
# What a shard refuses because of the request itself fails the whole call with the shard's status, on every
# replica alike; anything else is the shard's failure.
_CALLERS_FAULT = (InvalidArgumentError, ResourceExhaustedError)

log = logging.getLogger(__name__)


async def _all_settled(*calls) -> list:
    """Every call's result, once every call has ended; then the first failure is raised (a caller's fault before
    an outage). A plain gather raises at the first failure and leaves the other shards' writes in flight: the
    caller got its error while a delete was still landing elsewhere, outside the image ids' locks."""
    results = await asyncio.gather(*calls, return_exceptions=True)
    failures = [r for r in results if isinstance(r, BaseException)]
    if failures:
        raise next((f for f in failures if isinstance(f, _CALLERS_FAULT)), failures[0])
    return results

OK, TIMEOUT, UNAVAILABLE, ERROR = "ok", "timeout", "unavailable", "error"


@dataclass(frozen=True, kw_only=True)
class ShardAnswer:
    shard: str
    address: str
    outcome: str  # ok | timeout | unavailable | error
    message: str = ""
    hits: tuple[Hit, ...] = ()


@dataclass(frozen=True, kw_only=True)
class _ReplicaReply:
    address: str  # the replica that answered, or failed last
    outcome: str  # ok | timeout | unavailable | error
    message: str = ""
    value: object = None  # what the call returned, when ok


@dataclass(frozen=True, kw_only=True)
class FanoutResult:
    hits: tuple[Hit, ...]
    answers: tuple[ShardAnswer, ...]
    fanout_s: float
    merge_s: float

    @property
    def partial(self) -> bool:
        return any(a.outcome != OK for a in self.answers)


@dataclass(frozen=True, kw_only=True)
class ReplicaStats:
    shard: str
    address: str
    stats: ShardStats | None  # None: unreachable


class ShardPool:
    """One ShardClient per replica address of every shard in the map."""

    def __init__(self, shard_map: ShardMap, *, tls_ca_file: Path | None = None, tls_cert_file: Path | None = None,
                 tls_key_file: Path | None = None, calls_in_flight: int = 1, batch_max_searches: int = 64,
                 search_streams: bool = True, removal_journal: HintJournal | None = None):
        """`calls_in_flight`: searches to one replica beyond this many calls in flight queue and go out as one
        SearchBatch (broker.coalesce); 0 sends every search as its own call. `search_streams`: searches go over
        long-lived SearchStream calls (ShardClient). `removal_journal`: where the
        stale-copy removals that a down replica missed are kept beyond this broker's life (broker.removal_hints)."""
        if calls_in_flight < 0:
            raise ValueError("calls_in_flight must be >= 0")
        self.shard_map = shard_map
        creds = channel_credentials(tls_ca_file, tls_cert_file, tls_key_file)
        self._replicas: dict[str, list[ShardClient]] = {
            name: [ShardClient(address, channel_credentials=creds, search_streams=search_streams)
                   for address in addresses]
            for name, addresses in shard_map.shards.items()
        }
        self._searchers: dict[str, list[SearchCoalescer]] = {
            name: [
                SearchCoalescer(c, max_in_flight=calls_in_flight or sys.maxsize, max_batch=batch_max_searches)
                for c in clients
            ]
            for name, clients in self._replicas.items()
        }
        self._addresses = {name: list(addresses) for name, addresses in shard_map.shards.items()}
        self._next = {name: itertools.count() for name in shard_map.shards}
        self._suspect_until: dict[str, float] = {}  # replica address -> until when it is asked last
        self._strikes: dict[str, int] = {}  # replica address -> its failures in a row since it last answered
        self.removal_hints = RemovalHints(
            {address: client for name, clients in self._replicas.items()
             for address, client in zip(self._addresses[name], clients, strict=True)},
            journal=removal_journal,
        )

    async def close(self) -> None:
        await self.removal_hints.stop()
        await asyncio.gather(
            *(c.close() for clients in self._replicas.values() for c in clients), return_exceptions=True
        )

    # -- search --
    async def search(self, query: SearchQuery, *, timeout_s: float) -> FanoutResult:
        deadline = time.monotonic() + max(0.0, timeout_s - RESPONSE_MARGIN_S)
        targets = self.shard_map.shards_for(query.categories)
        t0 = time.perf_counter()
        calls = [
            self._search_shard(name, replace(query, categories=cats), deadline)
            for name, cats in targets.items()
        ]
        # One shard: await it here rather than through a task (a loop iteration less on the hot path).
        answers = [await calls[0]] if len(calls) == 1 else await asyncio.gather(*calls)
        t1 = time.perf_counter()
        hits = merge_top_k([a.hits for a in answers], query.top_k, distinct=query.distinct_products)
        t2 = time.perf_counter()
        result = FanoutResult(hits=hits, answers=tuple(answers), fanout_s=t1 - t0, merge_s=t2 - t1)
        if result.partial:
            PARTIAL_RESULTS.inc()
        return result

    async def _search_shard(self, name: str, query: SearchQuery, deadline: float) -> ShardAnswer:
        reply = await self._ask_replicas(
            name, lambda searcher, t: searcher.search(query, timeout_s=t), deadline, self._searchers[name]
        )
        SHARD_REQUESTS.labels(name, reply.outcome).inc()
        return ShardAnswer(
            shard=name,
            address=reply.address,
            outcome=reply.outcome,
            message=reply.message,
            hits=reply.value.hits if reply.outcome == OK else (),
        )

    async def _ask_replicas(self, name: str, call, deadline: float, clients: Sequence = ()) -> _ReplicaReply:
        """`call(client, timeout_s)` on a shard's replicas (their ShardClients, or the `clients` given, one per
        replica), round-robin, moving on to the next replica on UNAVAILABLE while the deadline allows.
        INVALID_ARGUMENT is the caller's fault and is raised."""
        clients, addresses = clients or self._replicas[name], self._addresses[name]
        start = next(self._next[name])
        # Round-robin, but a replica that ran out of time lately is asked last: a hung one (stopped, swapping)
        # would otherwise take three quarters of the deadline of every other search, and the shard's throughput
        # with it. It gets its turn again once the penalty is over.
        order = [(start + k) % len(clients) for k in range(len(clients))]
        if self._suspect_until:  # (nothing to sort on the hot path while every replica keeps up)
            now = time.monotonic()
            order.sort(key=lambda i: self._suspect_until.get(addresses[i], 0.0) > now)
            self._suspect_until = {a: t for a, t in self._suspect_until.items() if t > now}
        reply = _ReplicaReply(
            address=addresses[order[0]],
            outcome=TIMEOUT,
            message="deadline exceeded before the shard was called",
        )
        for attempt, i in enumerate(order):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            # A hung replica (stopped, swapping, partitioned without a RST) answers nothing and refuses nothing:
            # keep a quarter of what is left for the next replica, so it still gets a chance. (Not an equal
            # share: a healthy but loaded replica answering in over half the deadline must not be cut off.)
            last = attempt == len(clients) - 1
            budget = remaining if last else REPLICA_SHARE_OF_DEADLINE * remaining
            try:
                reply = _ReplicaReply(address=addresses[i], outcome=OK, value=await call(clients[i], budget))
                if self._strikes:
                    self._strikes.pop(addresses[i], None)
                return reply
            except _CALLERS_FAULT:
                raise  # the request is wrong, not the shard
            except UnavailableError as exc:
                reply = _ReplicaReply(address=addresses[i], outcome=UNAVAILABLE, message=str(exc))
                if not last:
                    self._ask_last(addresses[i], UNAVAILABLE_REPLICA_LAST_S)
                continue  # another replica may be up
            except DeadlineExceededError as exc:
                reply = _ReplicaReply(address=addresses[i], outcome=TIMEOUT, message=str(exc))
                if not last:  # the last one only had what the others left: the search's deadline, not its fault
                    self._ask_last(addresses[i], SLOW_REPLICA_LAST_S)
                continue  # another replica may answer in what is left
            except ImgsearchError as exc:
                return _ReplicaReply(address=addresses[i], outcome=ERROR, message=f"{exc.code.name}: {exc}")
        return reply

    def _ask_last(self, address: str, base_s: float) -> None:
        """Ask this replica last for `base_s`, doubled for each earlier failure in a row (up to MAX_REPLICA_LAST_S)."""
        strikes = self._strikes.get(address, 0)
        self._strikes[address] = strikes + 1
        self._suspect_until[address] = time.monotonic() + min(MAX_REPLICA_LAST_S, base_s * 2 ** min(strikes, 10))

    # -- writes --
    async def upsert(self, records: Sequence[Record], *, timeout_s: float) -> int:
        """Write records to every replica of their owning shards; the number of records written."""
        deadline = time.monotonic() + timeout_s
        by_shard = shard_for_records(self.shard_map, records)
        if len(by_shard) > 1:
            # A shard refuses a bad record (its attribute schema is its own) before writing any of the request,
            # but another shard would already have written its share: ask them all first, write second.
            # Fail fast: a refusal is the answer, and a validation writes nothing, so none is left to wait for (waiting
            # for a slow shard turned a bad record's INVALID_ARGUMENT into DEADLINE_EXCEEDED, which clients retry).
            await asyncio.gather(*(self._validate_on(name, recs, deadline) for name, recs in by_shard.items()))
        write_s = max(0.0, deadline - time.monotonic())  # what the validation left
        await _all_settled(
            *(
                self._on_every_replica(name, lambda c, recs=recs: c.upsert(recs, timeout_s=write_s))
                for name, recs in by_shard.items()
            )
        )
        # Idempotency by image id across a category change: an id re-ingested under a category owned by
        # another shard must not stay in its old shard. Written first, removed elsewhere second, so a failure
        # in between leaves a duplicate, never a loss. The removal carries the write's version (one per ingest
        # call): it takes only older copies, never a newer write of the same id that another broker made
        # meanwhile. Best effort: a shard that is down (every replica) does not fail the ingest (the write is
        # durable in its owner; counted); re-ingesting later removes the stale copy.
        owned = {name: {r.image_id for r in recs} for name, recs in by_shard.items()}
        others = {
            name: [
                r.image_id
                for recs in (v for k, v in by_shard.items() if k != name)
                for r in recs
                if r.image_id not in owned.get(name, ())  # never remove what this very call wrote there
            ]
            for name in self._replicas
        }
        # What is left of the caller's deadline, and no more than STALE_COPY_REMOVAL_MAX_S of it: a hung shard
        # that owns none of these records must not hold up (or time out) every ingest.
        removal_s = min(STALE_COPY_REMOVAL_MAX_S, max(0.0, deadline - time.monotonic()))
        removals = {name: ids for name, ids in others.items() if ids}
        # The write's version (one per ingest call: every record carries the same); 0 for unversioned writers.
        version = max((r.version for r in records), default=0)
        outcomes = await asyncio.gather(
            *(
                asyncio.gather(*(c.delete(ids, timeout_s=removal_s, version=version)
                                 for c in self._replicas[name]),
                               return_exceptions=True)
                for name, ids in removals.items()
            )
        )
        for name, replies in zip(removals, outcomes, strict=True):
            failed = [(a, r) for a, r in zip(self._addresses[name], replies, strict=True) if isinstance(r, BaseException)]
            if not failed:
                continue
            STALE_COPY_REMOVALS_FAILED.inc()
            log.warning("could not remove re-ingested ids from shard %s (%s): %s", name,
                        ", ".join(a for a, _ in failed), failed[0][1])
            # Replicas hold the same data: when those that answered removed nothing, nothing was moved off this
            # shard and the replicas cannot have diverged (every ingest sends its ids here, moved or not).
            removed = sum(r for r in replies if not isinstance(r, BaseException))
            if version and (removed or len(failed) == len(replies)):
                # Something moved off this shard (a replica that answered removed it), or nobody could say (every
                # replica down): the replicas that missed the removal may keep a copy. Versioned, the removal is
                # safe to send late (broker/removal_hints.py). Not when the replicas that answered removed
                # nothing: every ingest sends its ids to every other shard, and those would pile up for nothing.
                for i, reply in enumerate(replies):
                    if isinstance(reply, BaseException):
                        await self.removal_hints.add(self._addresses[name][i], removals[name], version,
                                                     timeout_s=max(0.0, deadline - time.monotonic()))
            if len(failed) < len(replies) and removed:
                # Some replicas removed the old copy and some did not: they would differ with nobody told. Like
                # any write that misses a replica, the ingest fails (UNAVAILABLE) and is safe to retry.
                address, error = failed[0]
                raise NoShardAvailableError(
                    f"shard {name} replica {address} could not remove the re-ingested ids' old copies: {error}"
                )
        return len(records)

    async def _validate_on(self, name: str, records: Sequence[Record], deadline: float) -> None:
        """Raise what shard `name` would refuse in these records; any other failure is left to the write."""
        await self._ask_replicas(
            name, lambda client, t: client.upsert(records, timeout_s=t, validate_only=True), deadline
        )

    async def delete(self, image_ids: Sequence[str], *, timeout_s: float, version: int = 0) -> int:
        """Delete ids from every replica of every shard (the category of an id is not known here), in
        batches of DELETE_BATCH_IDS; a failure part-way leaves earlier batches deleted (retrying is safe)."""
        deadline = time.monotonic() + timeout_s
        deleted = 0
        for start in range(0, len(image_ids), DELETE_BATCH_IDS):
            batch = list(image_ids[start : start + DELETE_BATCH_IDS])
            remaining = max(0.0, deadline - time.monotonic())
            counts = await _all_settled(
                *(
                    self._on_every_replica(
                        name, lambda c, b=batch, t=remaining: c.delete(b, timeout_s=t, version=version))
                    for name in self._replicas
                )
            )
            deleted += sum(counts)
        return deleted

    async def _on_every_replica(self, name: str, call) -> int:
        results = await asyncio.gather(*(call(c) for c in self._replicas[name]), return_exceptions=True)
        for address, result in zip(self._addresses[name], results):
            if isinstance(result, _CALLERS_FAULT):
                raise result
            if isinstance(result, BaseException):
                # Out of time is the caller's deadline (the write may or may not have landed), not an outage.
                error = ShardTimeoutError if isinstance(result, DeadlineExceededError) else NoShardAvailableError
                raise error(f"shard {name} replica {address}: {type(result).__name__}: {result}")
        return max(results)

    # -- stored records --
    async def get(self, image_id: str, *, timeout_s: float) -> Record:
        """The stored record of one catalogue image. Every shard is asked (an id's category, hence its shard, is
        not known here), each through its replicas in turn. UnknownImageError (NOT_FOUND) only when every shard
        answered without it; NoShardAvailableError (UNAVAILABLE) when it was not found and some shard could not
        be asked, since the image may be on that shard."""
        deadline = time.monotonic() + max(0.0, timeout_s - RESPONSE_MARGIN_S)

        async def from_shard(name: str) -> Record | None:
            reply = await self._ask_replicas(
                name, lambda client, t: client.get([image_id], timeout_s=t), deadline
            )
            if reply.outcome != OK:
                error = ShardTimeoutError if reply.outcome == TIMEOUT else NoShardAvailableError
                raise error(f"shard {name} ({reply.address}): {reply.outcome}: {reply.message}")
            return reply.value[0] if reply.value else None

        # Once a shard returned the image, the others get GET_NEWER_COPY_WAIT_S more, not the whole deadline (a
        # slow shard must not eat the deadline of a search by image id): an image can be held twice for a while
        # (moved while a replica of its old shard was down, broker/removal_hints.py), and the newest copy answers.
        tasks = [asyncio.ensure_future(from_shard(name)) for name in self._replicas]
        found: list[Record] = []
        try:
            pending, wait_until = set(tasks), None
            while pending:
                timeout_s = None if wait_until is None else max(0.0, wait_until - time.monotonic())
                done, pending = await asyncio.wait(pending, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
                if not done:
                    break  # the copy found is answered
                for task in done:
                    if task.exception() is None and isinstance(task.result(), Record):
                        found.append(task.result())
                if found and wait_until is None:
                    wait_until = time.monotonic() + GET_NEWER_COPY_WAIT_S
            if found:
                return max(found, key=lambda record: record.version)
        finally:
            for task in tasks:
                task.cancel()
        results = [t.exception() if t.exception() is not None else t.result() for t in tasks]
        for result in results:
            if isinstance(result, _CALLERS_FAULT):
                raise result
        failures = [r for r in results if isinstance(r, BaseException)]
        if failures:
            # Only out of time (a deadline too short for any shard, or shards too slow): the caller's deadline,
            # not an outage.
            error = ShardTimeoutError if all(isinstance(r, ShardTimeoutError) for r in failures) \
                else NoShardAvailableError
            raise error(
                f"image {image_id!r} is on none of the shards that answered, and {len(failures)} could not be "
                f"asked: {'; '.join(map(str, failures))}"
            )
        raise UnknownImageError(f"no catalogue image {image_id!r}")

    async def stored(
        self, categories: Mapping[str, str], *, timeout_s: float
    ) -> tuple[dict[str, Record], set[str]]:
        """The stored records of catalogue images whose categories are known (image id -> category), each asked
        of the shard that owns its category only: (records found, ids whose shard could not be asked). Ids that
        their shard answered without are in neither."""
        deadline = time.monotonic() + max(0.0, timeout_s - RESPONSE_MARGIN_S)
        by_shard: dict[str, list[str]] = {}
        for image_id, category in categories.items():
            by_shard.setdefault(self.shard_map.shard_for(category), []).append(image_id)

        async def from_shard(name: str, ids: list[str]) -> _ReplicaReply:
            return await self._ask_replicas(name, lambda client, t: client.get(ids, timeout_s=t), deadline)

        replies = await asyncio.gather(*(from_shard(name, ids) for name, ids in by_shard.items()))
        found: dict[str, Record] = {}
        unasked: set[str] = set()
        for ids, reply in zip(by_shard.values(), replies, strict=True):
            if reply.outcome == OK:
                found.update((record.image_id, record) for record in reply.value)
            else:
                unasked.update(ids)
        return found, unasked

    # -- stats and health --
    async def stats(self, *, timeout_s: float) -> list[ReplicaStats]:
        async def one(name: str, address: str, client: ShardClient) -> ReplicaStats:
            try:
                return ReplicaStats(
                    shard=name, address=address, stats=await client.stats(timeout_s=timeout_s)
                )
            except ImgsearchError:
                return ReplicaStats(shard=name, address=address, stats=None)

        return list(
            await asyncio.gather(
                *(
                    one(name, address, client)
                    for name in self.shard_map.shard_names
                    for address, client in zip(self._addresses[name], self._replicas[name])
                )
            )
        )

    async def reachable(self, *, timeout_s: float) -> dict[str, bool]:
        """For every shard: whether at least one of its replicas answers its health check."""

        async def any_replica(clients: list[ShardClient]) -> bool:
            for client in clients:
                try:
                    if await client.health(timeout_s=timeout_s):
                        return True
                except ImgsearchError:
                    continue
            return False

        answers = await asyncio.gather(*(any_replica(c) for c in self._replicas.values()))
        return dict(zip(self._replicas, answers, strict=True))


def shard_for_records(shard_map: ShardMap, records: Iterable[Record]) -> Mapping[str, list[Record]]:
    by_shard: dict[str, list[Record]] = {}
    for record in records:
        by_shard.setdefault(shard_map.shard_for(record.category), []).append(record)
    return by_shard
