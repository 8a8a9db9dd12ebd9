"""Duplicate cache in Redis: catalogue images by perceptual hash, for exact and near-exact lookups.

Layout (all keys under a prefix, default ``imgsearch:``):

- ``img:{image_id}``: hash with the entry (pHash, dHash, colour signature, product id, category, attributes as
  JSON, embedding as raw float32 bytes, kept to confirm near matches without a shard call).
- ``ph:{phash:016x}``: set of image ids with exactly this 64-bit pHash.
- ``band:{i}:{value:x}``: set of image ids whose pHash has this value in band i (multi-index hashing).

The 64-bit pHash is split into 6 bands (11, 11, 11, 11, 10, 10 bits). Two hashes within Hamming distance
r <= 5 differ in at most 5 bands, so they agree exactly on at least one: looking up the query's 6 band values
finds every catalogue hash within the radius. Candidates are then checked on both pHash and dHash distance, and
on their colours (embedder.hashing.same_colours): the hashes see brightness only, so a product's recoloured
variant or a greyscale copy has the same hashes as the original, and must not be answered for it.

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

from embedder.hashing import same_colours

BAND_BITS = (11, 11, 11, 11, 10, 10)
# Cap on candidates whose hashes a lookup reads (a pathological band value shared by very many images). A million
# catalogue images give ~4,400 candidates a lookup (review of 2026-12-05), nearly all outside the radius.
MAX_CANDIDATES = 50_000
# Cap on matches within the radius whose whole entries (2 KB embedding included) a lookup reads, nearest first.
MAX_MATCHES = 256

_FIELDS = ("phash", "dhash", "product_id", "category", "attributes", "embedding", "colour")


class CacheUnavailable(Exception):
    """Redis could not be reached in time; the caller goes on without the cache."""


def bands(phash: int) -> tuple[int, ...]:
    values = []
    shift = 64
    for width in BAND_BITS:
        shift -= width
        values.append((phash >> shift) & ((1 << width) - 1))
    return tuple(values)


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()


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


@dataclass(frozen=True, kw_only=True)
class CacheMatch:
    entry: CacheEntry
    exact: bool  # both hashes identical, and the same colours
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

    # -- keys --
    def _img(self, image_id: str) -> str:
        return f"{self._prefix}img:{image_id}"

    def _ph(self, phash: int) -> str:
        return f"{self._prefix}ph:{phash:016x}"

    def _band(self, i: int, value: int) -> str:
        return f"{self._prefix}band:{i}:{value:x}"

    async def _call(self, coro, timeout_s: float | None = None):
        """Run one Redis round trip under the timeout; failures open the breaker for backoff_s."""
        if time.monotonic() < self._down_until:
            coro.close()
            raise CacheUnavailable("redis bypassed after a recent failure")
        try:
            return await asyncio.wait_for(coro, timeout_s or self._timeout_s)
        except (TimeoutError, RedisError, OSError) as exc:
            self._down_until = time.monotonic() + self._backoff_s
            raise CacheUnavailable(f"redis: {type(exc).__name__}: {exc}") from exc

    async def ping(self) -> bool:
        try:
            return bool(await self._call(self._redis.ping()))
        except CacheUnavailable:
            return False

    async def lookup(self, phash: int, dhash: int, colour: bytes = b"") -> list[CacheMatch]:
        """Catalogue images within the near-duplicate radius and of the same colours, exact matches first. An
        entry without a colour signature (written by an older broker) is returned as a near match at best, for the
        embedding to confirm; so is every match when the query's `colour` is not given."""
        pipe = self._redis.pipeline(transaction=False)
        pipe.smembers(self._ph(phash))
        for i, value in enumerate(bands(phash)):
            pipe.smembers(self._band(i, value))
        sets = await self._call(pipe.execute())
        ids: list[bytes] = list(dict.fromkeys(m for s in sets for m in sorted(s)))[:MAX_CANDIDATES]
        if not ids:
            return []
        # The candidates' hashes first (32 bytes each), then whole entries for those within the radius only: the
        # first version read every candidate's entry, ~1 MB a lookup at a million images, and cut the candidates
        # at 512 before any distance check, so true matches past the 512th (by id) were never seen.
        pipe = self._redis.pipeline(transaction=False)
        for image_id in ids:
            pipe.hmget(self._img(image_id.decode()), "phash", "dhash")
        hashes = await self._call(pipe.execute())
        near: list[tuple[int, int, bytes]] = []
        for image_id, (ph, dh) in zip(ids, hashes):
            if ph is None or dh is None:
                continue  # entry deleted between the round trips
            dp, dd = hamming(int(ph, 16), phash), hamming(int(dh, 16), dhash)
            if dp <= self._phash_radius and dd <= self._dhash_radius:
                near.append((dp, dd, image_id))
        near.sort(key=lambda n: (n[0] + n[1], n[2]))
        near = near[:MAX_MATCHES]
        if not near:
            return []
        pipe = self._redis.pipeline(transaction=False)
        for _, _, image_id in near:
            pipe.hmget(self._img(image_id.decode()), *_FIELDS)
        rows = await self._call(pipe.execute())
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
            matches.append(CacheMatch(entry=entry, exact=dp == 0 and dd == 0 and vouched, phash_distance=dp,
                                      dhash_distance=dd))
        matches.sort(key=lambda m: (not m.exact, m.phash_distance + m.dhash_distance, m.entry.image_id))
        return matches

    async def get(self, image_id: str) -> CacheEntry | None:
        row = await self._call(self._redis.hmget(self._img(image_id), *_FIELDS))
        return None if row[0] is None else _entry_from_row(image_id, row)

    async def upsert(self, entry: CacheEntry) -> None:
        """Add or replace the entry of an image id (its old hash-index memberships are removed)."""
        old = await self._call(self._redis.hget(self._img(entry.image_id), "phash"), self._write_timeout_s)
        pipe = self._redis.pipeline(transaction=True)
        if old is not None:
            self._unindex(pipe, entry.image_id, int(old, 16))
        pipe.delete(self._img(entry.image_id))
        pipe.hset(
            self._img(entry.image_id),
            mapping={
                "phash": f"{entry.phash:016x}",
                "dhash": f"{entry.dhash:016x}",
                "product_id": entry.product_id,
                "category": entry.category,
                "attributes": json.dumps(dict(entry.attributes), sort_keys=True),
                "embedding": np.asarray(entry.embedding, dtype="<f4").tobytes(),
                "colour": entry.colour,
            },
        )
        pipe.sadd(self._ph(entry.phash), entry.image_id)
        for i, value in enumerate(bands(entry.phash)):
            pipe.sadd(self._band(i, value), entry.image_id)
        await self._call(pipe.execute(), self._write_timeout_s)

    async def delete(self, image_id: str) -> bool:
        return await self.delete_many([image_id]) == 1

    async def delete_many(self, image_ids: Sequence[str]) -> int:
        """Remove the entries of these image ids in two round trips (read their hashes, then unindex and
        delete in one transaction), not two per id: a bulk delete must not open a connection per id."""
        ids = list(dict.fromkeys(image_ids))
        if not ids:
            return 0
        read = self._redis.pipeline(transaction=False)
        for image_id in ids:
            read.hget(self._img(image_id), "phash")
        old_hashes = await self._call(read.execute(), self._write_timeout_s)
        write = self._redis.pipeline(transaction=True)
        found = 0
        for image_id, old in zip(ids, old_hashes):
            if old is not None:
                self._unindex(write, image_id, int(old, 16))
                write.delete(self._img(image_id))
                found += 1
        if found:
            await self._call(write.execute(), self._write_timeout_s)
        return found

    def _unindex(self, pipe, image_id: str, phash: int) -> None:
        pipe.srem(self._ph(phash), image_id)
        for i, value in enumerate(bands(phash)):
            pipe.srem(self._band(i, value), image_id)

    async def close(self) -> None:
        await self._redis.aclose()


def _entry_from_row(image_id: str, row) -> CacheEntry:
    phash, dhash, product_id, category, attributes, embedding, colour = row
    return CacheEntry(
        image_id=image_id,
        product_id=product_id.decode(),
        category=category.decode(),
        phash=int(phash, 16),
        dhash=int(dhash, 16),
        attributes=json.loads(attributes),
        embedding=np.frombuffer(embedding, dtype="<f4").astype(np.float32),
        colour=colour or b"",
    )
