"""Duplicate cache in Redis: catalogue images by perceptual hash, for exact and near-exact lookups.

Layout (all keys under a prefix, default ``imgsearch:``):

- ``img:{image_id}``: hash with the entry (pHash, dHash, colour and brightness signatures, product id, category,
  attributes as JSON, embedding as raw float32 bytes, kept to confirm near matches without a shard call), the
  write's version and the hash-index keys that list it. Upserts and deletes are Lua scripts: one step each, so concurrent writes
  of an id (two brokers, the repair loop) leave exactly the last entry's index behind, and an older version never
  replaces a newer entry.
- ``hph:{phash:016x}``: set of the entries with exactly this 64-bit pHash, each member the entry's pHash and
  dHash (32 hex digits) followed by its image id, so that a lookup filters its candidates by distance from the
  sets alone: reading each candidate's hashes took a pipelined HMGET each, ~21 us of client CPU apiece, and ran
  past the 50 ms Redis timeout at ~2,400 candidates (a million images give ~4,400; review of 2026-12-05).
- ``hband:{i}:{value:x}``: the same members, for the entries whose pHash has this value in band i (multi-index
  hashing).
- ``ph:`` and ``band:`` sets of plain image ids: written by brokers before the above; still read (each candidate's
  hashes then read from its entry) until their entries are written again.

The 64-bit pHash is split into 6 bands (11, 11, 11, 11, 10, 10 bits). Two hashes within Hamming distance
r <= 5 differ in at most 5 bands, so they agree exactly on at least one: looking up the query's 6 band values
finds every catalogue hash within the radius. Candidates are then checked on both pHash and dHash distance, and
on their colours (embedder.hashing.same_colours): the hashes see brightness only, so a product's recoloured
variant or a greyscale copy has the same hashes as the original, and must not be answered for it. An exact
match (both hashes identical) is answered without an embedding, so it must also be as bright
(embedder.hashing.same_brightness): flat or nearly flat pictures hash alike at any brightness.

Redis is an optimisation, not a source of truth: every call has a short timeout, and after a failure the cache
is bypassed for ``backoff_s`` so a dead Redis costs nothing per request. Callers get
:class:`CacheUnavailable`.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from broker.metrics import CACHE_LOOKUPS_SAMPLED
from embedder.hashing import hamming, same_brightness, same_colours

BAND_BITS = (11, 11, 11, 11, 10, 10)
# Candidates a lookup reads. It must stay well inside the broker's 50 ms Redis timeout: reading every candidate ran
# past it from ~15,000 (review of 2026-12-05). With hiredis parsing the replies (a dependency) and the distances
# vectorised, 4,400 candidates (a million catalogue images; 500-3,000 a set) take ~6 ms here, and ~2 us more each. The
# query's sets are read whole from the smallest up while they fit; a set that does not is sampled with what is left
# (at least MIN_SAMPLE). A match within the radius is in at least one of them, usually several, so it is missed only
# when every set it is in is among the largest (counted: imgsearch_broker_cache_lookups_sampled_total).
MAX_LOOKUP_CANDIDATES = 8_000
MIN_SAMPLE = 500
# The same for the older layout's sets of plain ids, whose candidates' hashes take an HMGET each (~21 us); no
# samples past it.
MAX_LEGACY_CANDIDATES = 1_000
# Cap on matches within the radius whose whole entries (2 KB embedding included) a lookup reads, nearest first.
MAX_MATCHES = 256

_FIELDS = ("phash", "dhash", "product_id", "category", "attributes", "embedding", "colour", "version", "brightness")
# Versions are stored as 20 decimal digits, so that Lua compares them as strings (its numbers are doubles, exact
# only to 2^53; versions are nanoseconds, ~2^60).
_VERSION_DIGITS = 20

# An upsert in one step, so that concurrent writes of one id (two brokers, the repair loop) cannot each remove
# only the hash-index memberships they read and leave the others behind, and an older write (a lower version)
# never replaces a newer entry. Each entry lists its own index keys and member (``index_keys``, ``index_member``);
# for an entry written before that, the caller passes the older layout's keys of the hash it read. KEYS[1]: the
# entry; ARGV: image id, version, the new member, the new index keys (count, keys), the older layout's keys
# (count, keys), then the entry's fields and values.
# (Index keys not in KEYS: fine on one Redis; a Redis Cluster would need them in one hash slot.)
_UPSERT_SCRIPT = """
local key, id, version, member = KEYS[1], ARGV[1], ARGV[2], ARGV[3]
local stored = redis.call('HMGET', key, 'version', 'index_keys', 'phash', 'index_member')
if stored[1] and stored[1] > version then return 0 end
local i = 4
local new_keys = {}
for j = 1, tonumber(ARGV[i]) do new_keys[j] = ARGV[i + j] end
i = i + #new_keys + 1
local fallback = {}
for j = 1, tonumber(ARGV[i]) do fallback[j] = ARGV[i + j] end
i = i + #fallback + 1
if stored[2] then
  for k in string.gmatch(stored[2], '%S+') do redis.call('SREM', k, stored[4] or id) end
elseif stored[3] then
  for _, k in ipairs(fallback) do redis.call('SREM', k, id) end
end
redis.call('DEL', key)
redis.call('HSET', key, unpack(ARGV, i))
for _, k in ipairs(new_keys) do redis.call('SADD', k, member) end
return 1
"""

# Deletes in one step: KEYS are entries; ARGV[1] = 1 to delete only entries still as expected (ARGV[2..]: their
# phash, dhash and version, three per key: a stale entry found by a search, which a re-ingest may have replaced
# meanwhile), else 0 (ARGV[2..]: the image ids). Entries without index_keys (older brokers) are deleted and their
# phash returned, for the caller to unindex. Returns {entries deleted, then image id, phash pairs}.
_DELETE_SCRIPT = """
local result = {0}
local expect = ARGV[1] == '1'
for n, key in ipairs(KEYS) do
  local stored = redis.call('HMGET', key, 'index_keys', 'phash', 'dhash', 'version', 'index_member')
  local id = ARGV[n + 1]
  local go = stored[2] ~= false
  if expect then
    id = ARGV[4 * n - 2]
    go = go and stored[2] == ARGV[4 * n - 1] and stored[3] == ARGV[4 * n]
      and (stored[4] or '00000000000000000000') == ARGV[4 * n + 1]
  end
  if go then
    if stored[1] then
      for k in string.gmatch(stored[1], '%S+') do redis.call('SREM', k, stored[5] or id) end
    else
      table.insert(result, id)
      table.insert(result, stored[2])
    end
    redis.call('DEL', key)
    result[1] = result[1] + 1
  end
end
return result
"""


class CacheUnavailable(Exception):
    """Redis could not be reached in time; the caller goes on without the cache."""


class CacheOutOfTime(CacheUnavailable):
    """The caller's own deadline cut the call short: nothing is known to be wrong with Redis."""


def bands(phash: int) -> tuple[int, ...]:
    values = []
    shift = 64
    for width in BAND_BITS:
        shift -= width
        values.append((phash >> shift) & ((1 << width) - 1))
    return tuple(values)


@dataclass(frozen=True, kw_only=True)
class CacheEntry:
    image_id: str
    product_id: str
    category: str
    phash: int
    dhash: int
    embedding: np.ndarray  # float32 (dim,), unit norm
    attributes: Mapping[str, str | float | bool] = field(default_factory=dict)
    colour: bytes = b""  # embedder.hashing.colour_signature; empty in entries written before it existed
    brightness: bytes = b""  # embedder.hashing.brightness_signature; empty in entries written before it existed
    version: int = 0  # the ingest's write version (broker.versions); 0 in entries written before versions


@dataclass(frozen=True, kw_only=True)
class CacheMatch:
    entry: CacheEntry
    exact: bool  # both hashes identical, the same colours and the same brightness
    phash_distance: int
    dhash_distance: int


class DuplicateCache:
    def __init__(
        self,
        url: str,
        *,
        timeout_s: float = 0.05,
        write_timeout_s: float = 1.0,
        backoff_s: float = 1.0,
        prefix: str = "imgsearch:",
        phash_radius: int = 5,
        dhash_radius: int = 5,
    ):
        if phash_radius >= len(BAND_BITS):
            raise ValueError(f"pHash radius {phash_radius} needs more than {len(BAND_BITS)} bands")
        self._redis = aioredis.Redis.from_url(
            url,
            socket_timeout=max(timeout_s, write_timeout_s),
            socket_connect_timeout=timeout_s,
            retry_on_timeout=False,
            health_check_interval=0,
        )
        self._timeout_s = timeout_s
        self._write_timeout_s = write_timeout_s
        self._backoff_s = backoff_s
        self._prefix = prefix
        self._phash_radius = phash_radius
        self._dhash_radius = dhash_radius
        self._down_until = 0.0
        self._upsert = self._redis.register_script(_UPSERT_SCRIPT)
        self._delete_script = self._redis.register_script(_DELETE_SCRIPT)

    # -- keys --
    def _img(self, image_id: str) -> str:
        return f"{self._prefix}img:{image_id}"

    def _ph(self, phash: int) -> str:
        return f"{self._prefix}ph:{phash:016x}"

    def _band(self, i: int, value: int) -> str:
        return f"{self._prefix}band:{i}:{value:x}"

    def _hashed_keys(self, phash: int) -> list[str]:
        """The sets that list an entry of this pHash (members: hashes + image id)."""
        return [f"{self._prefix}hph:{phash:016x}",
                *(f"{self._prefix}hband:{i}:{value:x}" for i, value in enumerate(bands(phash)))]

    async def _call(self, coro, timeout_s: float | None = None, *, own_deadline: float | None = None,
                    deadline: float | None = None):
        """Run one Redis round trip within Redis's own budget (`own_deadline`, shared by the round trips of one
        operation; else `timeout_s` from now) and the caller's `deadline`. Redis failing or overrunning its own
        budget opens the breaker for backoff_s; the caller running out of time says nothing of Redis and does
        not (a search with 10 ms left must not switch the cache off for every other search)."""
        if time.monotonic() < self._down_until:
            coro.close()
            raise CacheUnavailable("redis bypassed after a recent failure")
        now = time.monotonic()
        own = own_deadline if own_deadline is not None else now + (timeout_s or self._timeout_s)
        end = own if deadline is None else min(own, deadline)
        caller_bound = end < own
        if end <= now:
            coro.close()
            if caller_bound:
                raise CacheOutOfTime("no time left for redis")
            self._down_until = now + self._backoff_s
            raise CacheUnavailable("redis: over its time budget")
        try:
            async with asyncio.timeout(end - now):  # not wait_for: it can drop a cancel on 3.11 (hint_journal)
                return await coro
        except TimeoutError as exc:
            if caller_bound:
                raise CacheOutOfTime("redis: the caller's deadline passed") from exc
            self._down_until = time.monotonic() + self._backoff_s
            raise CacheUnavailable(f"redis: {type(exc).__name__}: {exc}") from exc
        except (RedisError, OSError) as exc:
            self._down_until = time.monotonic() + self._backoff_s
            raise CacheUnavailable(f"redis: {type(exc).__name__}: {exc}") from exc

    async def ping(self) -> bool:
        try:
            return bool(await self._call(self._redis.ping()))
        except CacheUnavailable:
            return False

    async def lookup(self, phash: int, dhash: int, colour: bytes = b"", *, brightness: bytes = b"",
                     deadline: float | None = None) -> list[CacheMatch]:
        """Catalogue images within the near-duplicate radius and of the same colours, exact matches first (the
        same hashes, colours and brightness). An entry without a colour or brightness signature (written by an
        older broker) is returned as a near match at best, for the embedding to confirm; so is every match when
        the query's `colour` or `brightness` is not given. The whole lookup (three or
        four round trips) gets the Redis timeout, and at most until the caller's `deadline` (time.monotonic()): a
        Redis answering each round trip within the timeout used to take several timeouts per lookup."""
        limits = _budget(self._timeout_s, deadline)
        hashed_keys, legacy_keys = self._hashed_keys(phash), self._index_keys(phash)
        members, legacy_ids = await self._read_sets(hashed_keys, legacy_keys, limits)
        legacy_ids = sorted(legacy_ids - {member[32:] for member in members})
        if legacy_ids:  # entries of older brokers: their hashes from the entries, made into members
            pipe = self._redis.pipeline(transaction=False)
            for image_id in legacy_ids:
                pipe.hmget(self._img(image_id.decode()), "phash", "dhash")
            members += [ph + dh + image_id for image_id, (ph, dh) in zip(legacy_ids, await self._call(pipe.execute(), **limits))
                        if ph is not None and dh is not None]  # else deleted between the round trips
        near = [(int(dp), int(dd), member[32:]) for (dp, dd), member in zip(_distances(members, phash, dhash), members)
                if dp <= self._phash_radius and dd <= self._dhash_radius]
        near.sort(key=lambda n: (n[0] + n[1], n[2]))
        nearest: dict[bytes, tuple[int, int, bytes]] = {}
        for match in near:  # an id listed twice (a stale member) keeps its nearest place
            nearest.setdefault(match[2], match)
        near = list(nearest.values())[:MAX_MATCHES]
        if not near:
            return []
        pipe = self._redis.pipeline(transaction=False)
        for _, _, image_id in near:
            pipe.hmget(self._img(image_id.decode()), *_FIELDS)
        rows = await self._call(pipe.execute(), **limits)
        matches = []
        for (_, _, image_id), row in zip(near, rows):
            if row[0] is None:
                continue  # entry deleted between the round trips
            entry = _entry_from_row(image_id.decode(), row)
            dp, dd = hamming(entry.phash, phash), hamming(entry.dhash, dhash)  # it may have been rewritten since
            if dp > self._phash_radius or dd > self._dhash_radius:
                continue
            vouched = same_colours(entry.colour, colour)
            if entry.colour and colour and not vouched:
                continue  # another colour of the picture: another product's variant, or a greyscale copy
            # A flat or nearly flat picture hashes alike at any brightness (a grey square and a white one): the
            # hashes' agreement vouches for nothing there, so the embedding decides unless the brightness agrees.
            exact = dp == 0 and dd == 0 and vouched and same_brightness(entry.brightness, brightness)
            matches.append(CacheMatch(entry=entry, exact=exact, phash_distance=dp, dhash_distance=dd))
        matches.sort(key=lambda m: (not m.exact, m.phash_distance + m.dhash_distance, m.entry.image_id))
        return matches

    async def _read_sets(self, hashed_keys: list[str], legacy_keys: list[str],
                         limits: dict) -> tuple[list[bytes], set[bytes]]:
        """The members of the query's sets (see MAX_LOOKUP_CANDIDATES): the hashed layout's members, and the older
        layout's image ids."""
        keys = [*hashed_keys, *legacy_keys]
        pipe = self._redis.pipeline(transaction=False)
        for key in keys:
            pipe.scard(key)
        sizes = await self._call(pipe.execute(), **limits)
        reads: dict[int, int] = {}  # set index -> members to read (all of it, or a sample)
        for part, budget, least in ((range(len(hashed_keys)), MAX_LOOKUP_CANDIDATES, MIN_SAMPLE),
                                    (range(len(hashed_keys), len(keys)), MAX_LEGACY_CANDIDATES, 0)):
            for i in sorted((i for i in part if sizes[i]), key=lambda i: sizes[i]):  # smallest first
                if max(budget, least) > 0:
                    reads[i] = min(sizes[i], max(budget, least))
                budget = max(0, budget - sizes[i])
        if not reads:
            return [], set()
        if any(reads[i] < sizes[i] for i in reads):
            CACHE_LOOKUPS_SAMPLED.inc()
        pipe = self._redis.pipeline(transaction=False)
        for i, count in reads.items():
            if count < sizes[i]:
                pipe.srandmember(keys[i], count)
            else:
                pipe.smembers(keys[i])
        read = dict(zip(reads, await self._call(pipe.execute(), **limits)))
        members = set().union(*(read[i] for i in read if i < len(hashed_keys)))
        legacy_ids = set().union(*(read[i] for i in read if i >= len(hashed_keys)))
        return list(members), legacy_ids

    async def get(self, image_id: str) -> CacheEntry | None:
        row = await self._call(self._redis.hmget(self._img(image_id), *_FIELDS))
        return None if row[0] is None else _entry_from_row(image_id, row)

    def _index_keys(self, phash: int) -> list[str]:
        """The older layout's sets of plain image ids for this pHash."""
        return [self._ph(phash), *(self._band(i, value) for i, value in enumerate(bands(phash)))]

    async def upsert(self, entry: CacheEntry, *, deadline: float | None = None) -> bool:
        """Add or replace the entry of an image id, in one step (its old hash-index memberships are removed).
        False when the stored entry has a higher version (a later ingest of the id got there first). Both round
        trips share the write timeout, and end by the caller's `deadline` (time.monotonic()) at the latest."""
        limits = _budget(self._write_timeout_s, deadline)
        new_keys = self._hashed_keys(entry.phash)
        member = f"{entry.phash:016x}{entry.dhash:016x}{entry.image_id}"
        # Only entries of older brokers lack their index keys: the keys of the hash read now stand in for them.
        old = await self._call(self._redis.hget(self._img(entry.image_id), "phash"), **limits)
        fallback = self._index_keys(int(old, 16)) if old is not None else []
        fields = {
            "phash": f"{entry.phash:016x}",
            "dhash": f"{entry.dhash:016x}",
            "product_id": entry.product_id,
            "category": entry.category,
            "attributes": json.dumps(dict(entry.attributes), sort_keys=True),
            "embedding": np.asarray(entry.embedding, dtype="<f4").tobytes(),
            "colour": entry.colour,
            "brightness": entry.brightness,
            "version": _version(entry.version),
            "index_keys": " ".join(new_keys),
            "index_member": member,
        }
        args = [entry.image_id, _version(entry.version), member, len(new_keys), *new_keys, len(fallback), *fallback,
                *(x for pair in fields.items() for x in pair)]
        written = await self._call(self._upsert(keys=[self._img(entry.image_id)], args=args), **limits)
        return bool(written)

    async def delete(self, image_id: str) -> bool:
        return await self.delete_many([image_id]) == 1

    async def delete_many(self, image_ids: Sequence[str], *, deadline: float | None = None) -> int:
        """Remove the entries of these image ids, in one step and one round trip (not two per id: a bulk delete
        must not open a connection per id), by the caller's `deadline` (time.monotonic()) at the latest."""
        ids = list(dict.fromkeys(image_ids))
        if not ids:
            return 0
        return await self._delete([self._img(i) for i in ids], ["0", *ids], deadline)

    async def delete_stale(self, entries: Sequence[CacheEntry]) -> int:
        """Remove these entries only where Redis still holds them as they are (same hashes and version): an entry
        found stale by a search may have been replaced by a re-ingest since, whose entry must stay."""
        entries = list({e.image_id: e for e in entries}.values())
        if not entries:
            return 0
        args = ["1"]
        for e in entries:
            args += [e.image_id, f"{e.phash:016x}", f"{e.dhash:016x}", _version(e.version)]
        return await self._delete([self._img(e.image_id) for e in entries], args)

    async def _delete(self, keys: list[str], args: list[str], deadline: float | None = None) -> int:
        limits = _budget(self._write_timeout_s, deadline)
        result = await self._call(self._delete_script(keys=keys, args=args), **limits)
        legacy = result[1:]
        if legacy:  # entries of older brokers, without their index keys: unindexed from their hash
            pipe = self._redis.pipeline(transaction=True)
            for image_id, phash in zip(legacy[::2], legacy[1::2]):
                self._unindex(pipe, image_id.decode(), int(phash, 16))
            await self._call(pipe.execute(), **limits)
        return int(result[0])

    def _unindex(self, pipe, image_id: str, phash: int) -> None:
        pipe.srem(self._ph(phash), image_id)
        for i, value in enumerate(bands(phash)):
            pipe.srem(self._band(i, value), image_id)

    async def close(self) -> None:
        await self._redis.aclose()


def _budget(seconds: float, deadline: float | None) -> dict[str, float | None]:
    """`_call`'s limits for the round trips of one operation: Redis's own budget from now, and the caller's deadline."""
    return {"own_deadline": time.monotonic() + seconds, "deadline": deadline}


def _entry_from_row(image_id: str, row) -> CacheEntry:
    phash, dhash, product_id, category, attributes, embedding, colour, version, brightness = row
    return CacheEntry(
        image_id=image_id,
        product_id=product_id.decode(),
        category=category.decode(),
        phash=int(phash, 16),
        dhash=int(dhash, 16),
        attributes=json.loads(attributes),
        embedding=np.frombuffer(embedding, dtype="<f4").astype(np.float32),
        colour=colour or b"",
        brightness=brightness or b"",
        version=int(version) if version else 0,
    )


_POPCOUNT = np.array([i.bit_count() for i in range(256)], dtype=np.uint8)


def _distances(members: list[bytes], phash: int, dhash: int) -> np.ndarray:
    """(n, 2) Hamming distances of index members (32 hex digits of pHash and dHash, then the id) to the query's
    hashes, vectorised: ~0.1 us a member against ~4 us parsed one by one."""
    if not members:
        return np.zeros((0, 2), dtype=np.int64)
    raw = bytes.fromhex(b"".join(member[:32] for member in members).decode("ascii"))
    hashes = np.frombuffer(raw, dtype=">u8").astype(np.uint64).reshape(-1, 2)
    xored = hashes ^ np.array([phash, dhash], dtype=np.uint64)
    return _POPCOUNT[xored.view(np.uint8)].reshape(-1, 2, 8).sum(axis=2, dtype=np.int64)


def _version(version: int) -> str:
    return f"{version:0{_VERSION_DIGITS}d}"
