"""Pending stale-copy removals (broker/removal_hints.py) kept in Redis, so that a broker that stops or crashes
before a down shard replica is back does not lose them: any broker of the cluster finds them there and sends them.

Layout: one hash per replica address, ``{prefix}removals:{address}``, field image id, value the removal's write
version (decimal). A removal is versioned, so sending it twice, or from two brokers, is harmless; the journal only
has to keep, per id, the highest version a removal was made with, and forget a removal only when the version sent
is still the one kept (both done in Redis by a script, so two brokers cannot interleave them).

Versions are nanoseconds (~1.8e18), beyond the 2^53 that Lua's numbers hold exactly, so the scripts compare their
decimal strings: a longer string is larger, equal lengths compare as text.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Mapping

import redis.asyncio as aioredis
from redis.exceptions import RedisError

# Ids per script call (one Redis round trip each).
BATCH_IDS = 1_000

# ARGV: the hash's time to live in seconds, then id, version pairs.
_KEEP_HIGHEST = """
for i = 2, #ARGV, 2 do
  local kept = redis.call('HGET', KEYS[1], ARGV[i])
  local new = ARGV[i + 1]
  if (not kept) or (#kept < #new) or (#kept == #new and kept < new) then
    redis.call('HSET', KEYS[1], ARGV[i], new)
  end
end
redis.call('EXPIRE', KEYS[1], ARGV[1])
return 0
"""
# A replica's removals are kept this long after the last one was saved: a replica taken out of the shard map
# for good (nobody sends them any more) does not leave them in Redis forever.
JOURNAL_TTL_S = 14 * 24 * 3600
# Ids per HSCAN call of a load (each call under the timeout; a whole hash in one reply took over a second at
# ~150,000 ids without hiredis).
LOAD_BATCH_IDS = 1_000

_FORGET_IF_SENT = """
local forgotten = 0
for i = 1, #ARGV, 2 do
  if redis.call('HGET', KEYS[1], ARGV[i]) == ARGV[i + 1] then
    redis.call('HDEL', KEYS[1], ARGV[i])
    forgotten = forgotten + 1
  end
end
return forgotten
"""


class JournalUnavailable(Exception):
    """Redis could not be reached in time; the removals stay in the broker's memory only, for now."""


class HintJournal:
    def __init__(self, url: str, *, timeout_s: float = 1.0, backoff_s: float = 1.0, prefix: str = "imgsearch:"):
        self._redis = aioredis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, retry_on_timeout=False,
            health_check_interval=0,
        )
        self._timeout_s = timeout_s
        self._backoff_s = backoff_s
        self._prefix = prefix
        self._down_until = 0.0
        self._keep_highest = self._redis.register_script(_KEEP_HIGHEST)
        self._forget_if_sent = self._redis.register_script(_FORGET_IF_SENT)

    def _key(self, address: str) -> str:
        return f"{self._prefix}removals:{address}"

    async def _call(self, coro, *, breaker: bool = True):
        """One Redis round trip under the timeout; after a failure of a `breaker` call, those are not tried for
        backoff_s (a background load that failed does not hold up the saves of ingests)."""
        if breaker and time.monotonic() < self._down_until:
            coro.close()
            raise JournalUnavailable("redis bypassed after a recent failure")
        try:
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for returns the result and drops a cancel that
            # arrives in the loop iteration the reply does (gh-86296), so RemovalHints.stop() waited for good.
            async with asyncio.timeout(self._timeout_s):
                return await coro
        except (TimeoutError, RedisError, OSError) as exc:
            if breaker:
                self._down_until = time.monotonic() + self._backoff_s
            raise JournalUnavailable(f"redis: {type(exc).__name__}: {exc}") from exc

    async def save(self, address: str, removals: Mapping[str, int]) -> None:
        """Keep these removals for `address` (for each id, the highest version of any save)."""
        for args in _batches(removals):
            await self._call(self._keep_highest(keys=[self._key(address)], args=[JOURNAL_TTL_S, *args]))

    async def forget(self, address: str, removals: Mapping[str, int]) -> int:
        """Forget the removals that went through, unless a newer one of the same id was saved meanwhile."""
        forgotten = 0
        for args in _batches(removals):
            forgotten += await self._call(self._forget_if_sent(keys=[self._key(address)], args=args))
        return forgotten

    async def sizes(self, addresses: Iterable[str]) -> dict[str, int]:
        """How many removals are kept for each of these addresses (one round trip)."""
        addresses = list(addresses)
        pipe = self._redis.pipeline(transaction=False)
        for address in addresses:
            pipe.hlen(self._key(address))
        return dict(zip(addresses, await self._call(pipe.execute(), breaker=False), strict=True))

    async def load(self, address: str, *, limit: int | None = None) -> dict[str, int]:
        """The removals kept for `address` (at most about `limit`), read LOAD_BATCH_IDS at a time."""
        found: dict[str, int] = {}
        cursor = 0
        while True:
            cursor, rows = await self._call(
                self._redis.hscan(self._key(address), cursor, count=LOAD_BATCH_IDS), breaker=False)
            found.update((image_id.decode(), int(version)) for image_id, version in rows.items())
            if cursor == 0 or (limit is not None and len(found) >= limit):
                return found

    async def close(self) -> None:
        await self._redis.aclose()


def _batches(removals: Mapping[str, int]):
    items = list(removals.items())
    for start in range(0, len(items), BATCH_IDS):
        yield [value for image_id, version in items[start : start + BATCH_IDS] for value in (image_id, str(version))]
