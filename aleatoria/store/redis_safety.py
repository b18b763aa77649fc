"""Blocks, reports and bans in Redis (PROTOCOL.md section 13), shared by every instance.

Keys (the first four tagged like the pool, ``{available:webrtc}``, so the matchmaking script
reads them in its own cluster slot):
- ``aleatoria:blocks:{available:webrtc}:<user>``: set, whom ``user`` blocked (at most
  ``MAX_BLOCKS``, enforced by the ``BLOCK`` script, which also writes the next key);
- ``aleatoria:blocked-by:{available:webrtc}:<user>``: set, who blocked ``user`` (read once
  per handshake, with the ban, in one round trip);
- ``aleatoria:bans:{available:webrtc}``: hash, user -> the ban's JSON; an ended ban is
  removed when next read;
- ``aleatoria:shadow:{available:webrtc}``: sorted set, shadow-banned user -> end (unix
  seconds; ``FOREVER`` for a permanent one), read by the pick;
- ``aleatoria:reports``: a stream of reports (``report`` field: the JSON), capped at
  ``report_cap`` (exact ``MAXLEN``: reports are rare); its entry ids are the report ids;
- ``aleatoria:reporters:<user>``: sorted set, who reported ``user`` -> when, trimmed to the
  auto-shadow window and expiring with it;
- ``aleatoria:dm-partners:<user>``: sorted set, the partners ``user`` wrote to within the
  hour -> when first (ms), at most the limit, trimmed and checked and added to by one script
  (``DM_PARTNER``), expiring an hour after the last one added. Each partner Redis counted is
  noted in the fallback too, so during an outage the count goes on from what this instance
  saw (a user that wrote only through other instances starts from nothing here). A call is
  made only for a partner the connection does not know yet (``core.new_partner``); while
  Redis hangs it waits at most the call timeout, like every command, then the store degrades;
- ``aleatoria:reports-filed:<user>``: string, the reports ``user`` filed in its window of an
  hour (``REPORT_WINDOW``), expiring when the window ends; checked and counted by one script
  (``REPORT_COUNT``) before a report reads anything. What Redis counted is noted in the
  fallback too, as for the DM partners.

While Redis fails, each call falls back to this instance's ``MemorySafety`` (what it writes
there stays on this instance; a ban or block made during an outage must be made again once
Redis is back — the admin API answers from the fallback meanwhile). Matching meanwhile
happens in the mirror, between this instance's users: ``KnownSafety`` keeps them apart by
the fallback and by what their connections know (each loaded its ban and who blocked it
at its handshake, and hears of changes since), so a shadow ban or block made before the
outage still holds. A user who connects during an outage is admitted on the fallback alone.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from collections.abc import Set as AbstractSet
from functools import partial
from typing import Any, TypeVar

import orjson
import redis

from aleatoria.matchmaking import MatchFilter
from aleatoria.safety import (
    AUTO_SHADOW_WINDOW,
    FOREVER,
    MAX_BLOCKS,
    NEW_DM_WINDOW,
    REPORT_WINDOW,
    Admission,
    Ban,
    admission,
    either,
)
from aleatoria.store.memory_safety import MemorySafety
from aleatoria.store.redis_batch import scripted
from aleatoria.store.redis_keeper import RedisKeeper
from aleatoria.store.redis_scripts import (
    BANS_KEY,
    BLOCKED_BY_PREFIX,
    BLOCKS_PREFIX,
    DM_PARTNERS_PREFIX,
    DUE_KEY,
    REPORTS_FILED_PREFIX,
    SHADOW_KEY,
)

log = logging.getLogger("aleatoria.store.safety")

T = TypeVar("T")

REPORTS_KEY = "aleatoria:reports"
REPORTERS_PREFIX = "aleatoria:reporters:"
_SCAN_CHUNK = 200
_WINDOW_MS = int(NEW_DM_WINDOW * 1000)
_REPORT_WINDOW_MS = int(REPORT_WINDOW * 1000)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class KnownSafety:
    """The mirror's ``MatchFilter``: the fallback's blocks and bans (made during an outage)
    and what this instance's connections know (``StoreEvents``)."""

    def __init__(self, fallback: MemorySafety, known: MatchFilter) -> None:
        self._fallback = fallback
        self._known = known

    def barred(self, user: str) -> AbstractSet[str] | None:
        return either(self._fallback.barred(user), self._known.barred(user))

    def shadowed(self, user: str) -> bool:
        return self._fallback.shadowed(user) or self._known.shadowed(user)


class RedisSafety:
    def __init__(self, keeper: RedisKeeper, fallback: MemorySafety, *, report_cap: int) -> None:
        self._keeper = keeper
        self._fallback = fallback
        self._report_cap = report_cap
        self._block = keeper.client.scripts.block
        self._admit = keeper.client.scripts.admit
        self._dm_partner = keeper.client.scripts.dm_partner
        self._report_count = keeper.client.scripts.report_count

    async def _read(self, fn: Callable[[Any], T]) -> T | None:
        return await self._keeper.read(fn)

    async def _write(self, fn: Callable[[Any], T]) -> T | None:
        done = await self._keeper.run(fn)
        return None if done is None else done.value

    # -- admission -----------------------------------------------------------------------------

    async def admit(self, user: str, now: float) -> Admission:
        keys = [BANS_KEY, BLOCKED_BY_PREFIX + user]
        # Through ``_write`` (shielded) so that it joins the pass's batch: handshakes come in
        # bursts, and each would otherwise be its own thread hop.
        found = await self._write(scripted(self._admit, keys, [user]))
        if found is None:
            return self._fallback.admit_now(user, now)
        ban_json, blocked_by = found
        ban = None
        if ban_json is not None:
            ban = Ban.from_json(orjson.loads(ban_json))
            if not ban.active(now):
                await self._write(partial(_forget_ban, user=user))
                ban = None
        return admission(ban, (_text(who) for who in blocked_by))

    # -- blocks --------------------------------------------------------------------------------

    async def block(self, blocker: str, blocked: str) -> bool:
        keys = [BLOCKS_PREFIX + blocker, BLOCKED_BY_PREFIX + blocked]
        done = await self._write(partial(self._run_block, keys, [blocker, blocked, MAX_BLOCKS]))
        if done is None:
            return self._fallback.block_now(blocker, blocked)
        return bool(done)

    def _run_block(self, keys: list[str], args: list[Any], r: Any) -> Any:
        return self._block(keys, args, client=r)

    async def unblock(self, blocker: str, blocked: str) -> None:
        done = await self._write(partial(_unblock, blocker=blocker, blocked=blocked))
        if done is None:
            self._fallback.unblock_now(blocker, blocked)

    async def blocked(self, user: str) -> list[str]:
        found = await self._read(lambda r: r.smembers(BLOCKS_PREFIX + user))
        if found is None:
            return await self._fallback.blocked(user)
        return sorted(_text(who) for who in found)

    # -- new DM partners (PROTOCOL.md section 16) ---------------------------------------------

    async def new_dm_partner(self, user: str, partner: str, limit: int) -> float | None:
        # Through ``_write`` (shielded, bounded by the call timeout): it joins the pass's batch,
        # and while degraded it makes no call at all.
        args = [partner, int(time.time() * 1000), _WINDOW_MS, limit]
        age_ms = await self._write(scripted(self._dm_partner, [DM_PARTNERS_PREFIX + user], args))
        if age_ms is None:
            return self._fallback.dm_partners.add(user, partner, limit)
        if age_ms < 0:
            return None
        age = int(age_ms) / 1000
        self._fallback.dm_partners.note(user, partner, age, limit)
        return age

    # -- reports -------------------------------------------------------------------------------

    async def count_report(self, user: str, limit: int) -> bool:
        # As ``new_dm_partner``: one script through ``_write``, none while degraded.
        args = [_REPORT_WINDOW_MS, limit]
        found = await self._write(scripted(self._report_count, [REPORTS_FILED_PREFIX + user], args))
        if found is None:
            return self._fallback.report_counts.add(user, limit)
        count, left_ms = (int(value) for value in found)
        self._fallback.report_counts.note(user, limit if count < 0 else count, max(0, left_ms) / 1000)
        return count >= 0

    async def add_report(self, report: dict[str, Any], now: float) -> tuple[str, int]:
        data = orjson.dumps(report)
        fn = partial(
            _add_report,
            data=data,
            reported=str(report["reported"]),
            reporter=str(report["reporter"]),
            now=now,
            cap=self._report_cap,
        )
        done = await self._write(fn)
        if done is None:
            return self._fallback.add_report_now(orjson.loads(data), now)
        return done

    async def reports(
        self, limit: int, after: str | None = None, user: str | None = None
    ) -> list[dict[str, Any]]:
        found = await self._read(
            partial(_reports, limit=limit, after=after, user=user, scan=self._report_cap)
        )
        if found is None:
            return await self._fallback.reports(limit, after, user)
        return found

    # -- bans ----------------------------------------------------------------------------------

    async def ban(self, ban: Ban) -> None:
        done = await self._write(partial(_ban, ban=ban))
        if done is None:
            self._fallback.ban_now(ban)

    async def unban(self, user: str) -> bool:
        done = await self._write(partial(_forget_ban, user=user))
        if done is None:
            return await self._fallback.unban(user)
        return bool(done)

    async def bans(self, now: float) -> list[Ban]:
        found = await self._read(lambda r: r.hgetall(BANS_KEY))
        if found is None:
            return await self._fallback.bans(now)
        bans = [Ban.from_json(orjson.loads(value)) for value in found.values()]
        ended = [ban.user for ban in bans if not ban.active(now)]
        if ended:
            await self._write(partial(_forget_bans, users=ended))
        return sorted((ban for ban in bans if ban.active(now)), key=lambda ban: ban.created, reverse=True)


# -- the calls (worker threads) ------------------------------------------------------------------


def _unblock(r: redis.Redis, *, blocker: str, blocked: str) -> bool:
    pipe = r.pipeline(transaction=False)
    pipe.srem(BLOCKS_PREFIX + blocker, blocked)
    pipe.srem(BLOCKED_BY_PREFIX + blocked, blocker)
    # The pair may now be matched: whichever of the two searches is due at once, so the next
    # search tick (any instance's) runs on_change for it (``redis_search.TICK``).
    pipe.zadd(DUE_KEY, {blocker: 0, blocked: 0}, xx=True)
    pipe.execute()
    return True


def _add_report(
    r: redis.Redis, *, data: bytes, reported: str, reporter: str, now: float, cap: int
) -> tuple[str, int]:
    report_id = r.xadd(REPORTS_KEY, {"report": data}, maxlen=cap, approximate=False)
    key = REPORTERS_PREFIX + reported
    pipe = r.pipeline(transaction=False)
    pipe.zadd(key, {reporter: now})
    pipe.zremrangebyscore(key, "-inf", now - AUTO_SHADOW_WINDOW)
    pipe.zcard(key)
    pipe.expire(key, int(AUTO_SHADOW_WINDOW) + 60)
    _, _, reporters, _ = pipe.execute()
    return _text(report_id), int(reporters)


def _reports(
    r: redis.Redis, *, limit: int, after: str | None, user: str | None, scan: int
) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    upper = "+" if after is None else "(" + after
    scanned = 0
    while len(found) < limit and scanned < scan:
        chunk = r.xrevrange(REPORTS_KEY, max=upper, min="-", count=_SCAN_CHUNK if user else limit)
        if not chunk:
            break
        for entry_id, fields in chunk:
            scanned += 1
            raw = (fields or {}).get(b"report") or b"{}"
            report = orjson.loads(raw)
            report["id"] = _text(entry_id)
            if user is None or report.get("reported") == user:
                found.append(report)
                if len(found) >= limit:
                    break
        upper = "(" + _text(chunk[-1][0])
    return found


def _ban(r: redis.Redis, *, ban: Ban) -> bool:
    pipe = r.pipeline(transaction=False)
    pipe.hset(BANS_KEY, ban.user, orjson.dumps(ban.to_json()))
    if ban.shadow:
        pipe.zadd(SHADOW_KEY, {ban.user: FOREVER if ban.until is None else ban.until})
    else:
        pipe.zrem(SHADOW_KEY, ban.user)
    pipe.execute()
    return True


def _forget_ban(r: redis.Redis, *, user: str) -> int:
    pipe = r.pipeline(transaction=False)
    pipe.hdel(BANS_KEY, user)
    pipe.zrem(SHADOW_KEY, user)
    removed, _ = pipe.execute()
    return int(removed)


def _forget_bans(r: redis.Redis, *, users: list[str]) -> bool:
    pipe = r.pipeline(transaction=False)
    pipe.hdel(BANS_KEY, *users)
    pipe.zrem(SHADOW_KEY, *users)
    pipe.execute()
    return True
