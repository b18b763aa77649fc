"""Reading history from Redis: the queries, and merging in what the writer still holds.

Room history is a sorted set scored by createTime in epoch nanoseconds, as the original
stored it. Scores are doubles, exact to 256 ns at today's epoch values, so "strictly older
than ``before``" is decided by the score far from the bound and by the message's own
``createTime`` within ``_SCORE_SLACK`` of it (``before`` comes with microsecond precision).
DM history is a list, oldest first; entries past the TTL may still sit at its head until the
next write trims them, so a read stops at the newest one past the TTL (as the memory store).

Byte-bounded reads. A reply holds only the messages that fit in its byte budget
(``core._within``: each message counts its length plus one, from the end nearest the cursor
for a room page, from the newest for DMs). So the reads are scripts that walk the history from
that end, 16 rows at a time, and stop after the first message that takes the ones counted over
the budget: Redis sends about the budget plus one message, not ``limit`` messages (200 of
32 KB were 6.4 MB read for a 1 MiB reply). A room row whose score is within ``_SCORE_SLACK`` of
a bound is sent but not counted (the caller decides it by its ``createTime`` and may drop it),
so a read never stops short of what the reply keeps. Merging in the writer's queued messages
keeps that: the rows past the budget would all come after the reply's cut.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

import orjson
import redis
from redis.commands.core import Script

_SCORE_SLACK = 1024.0
_EXTRA_ROWS = 16

# KEYS: room:messages:{room}. ARGV: order ('rev': newest first, else oldest first), max and min
# (score bounds as ZRANGEBYSCORE takes them), low and high fence ('' for none: rows scored at
# or beyond a fence are not counted), limit (rows counted), the most rows in all, byte budget
# ('' for none), and a score to count the rows at or above ('' for none). Returns {that count,
# member, score, member, score, ...}: rows in order until ``limit`` are counted, or the
# counted rows' bytes (each its length plus one) exceed the budget, or the most rows are read.
ROOM_READ = """
local key, rev = KEYS[1], ARGV[1] == 'rev'
local high, low = ARGV[2], ARGV[3]
local low_fence = ARGV[4] == '' and -math.huge or tonumber(ARGV[4])
local high_fence = ARGV[5] == '' and math.huge or tonumber(ARGV[5])
local limit, most = tonumber(ARGV[6]), tonumber(ARGV[7])
local budget = ARGV[8] == '' and math.huge or tonumber(ARGV[8])
local out = {ARGV[9] == '' and 0 or redis.call('ZCOUNT', key, ARGV[9], '+inf')}
local counted, used, offset, chunk = 0, 0, 0, 16
while true do
  local rows
  if rev then
    rows = redis.call('ZREVRANGEBYSCORE', key, high, low, 'WITHSCORES', 'LIMIT', offset, chunk)
  else
    rows = redis.call('ZRANGEBYSCORE', key, low, high, 'WITHSCORES', 'LIMIT', offset, chunk)
  end
  for i = 1, #rows, 2 do
    local member, score = rows[i], rows[i + 1]
    out[#out + 1] = member
    out[#out + 1] = score
    local s = tonumber(score)
    if s > low_fence and s < high_fence then
      counted = counted + 1
      used = used + #member + 1
      if counted >= limit or used > budget then return out end
    end
    if #out > 2 * most then return out end
  end
  if #rows < 2 * chunk then return out end
  offset = offset + chunk
end
"""

# KEYS: dm:{a}:{b}. ARGV: limit, byte budget ('' for none). The newest entries, newest first:
# at most ``limit``, up to the first that takes their bytes (each its length plus one) over
# the budget.
DM_READ = """
local key, limit = KEYS[1], tonumber(ARGV[1])
local budget = ARGV[2] == '' and math.huge or tonumber(ARGV[2])
local out, used, stop, chunk = {}, 0, -1, 16
while #out < limit do
  local start = math.max(stop - chunk + 1, -limit)
  local rows = redis.call('LRANGE', key, start, stop)
  for i = #rows, 1, -1 do
    out[#out + 1] = rows[i]
    used = used + #rows[i] + 1
    if used > budget or #out >= limit then return out end
  end
  if #rows < stop - start + 1 then break end
  stop = start - 1
end
return out
"""


def read_room(
    r: redis.Redis,
    script: Script,
    *,
    key: str,
    limit: int,
    before_ns: int | None,
    cutoff_ns: int,
    count_newer: bool,
    max_bytes: int | None,
) -> tuple[list[tuple[bytes, float]], int]:
    """Newest first, newer than ``cutoff_ns``, strictly older than ``before_ns``, at most
    ``limit`` and about ``max_bytes``; and, when ``count_newer``, how many stored messages
    are not older than ``before_ns``. ``script``: ``ROOM_READ``."""
    low = f"({cutoff_ns}"
    args: list[int | str]
    if before_ns is None:
        args = ["rev", "+inf", low, "", "", limit, limit, _budget(max_bytes), ""]
        return _rows(script([key], args, r))[0], 0
    fence = float(before_ns) - _SCORE_SLACK
    newer = before_ns if count_newer else ""
    args = ["rev", before_ns, low, "", repr(fence), limit, limit + _EXTRA_ROWS, _budget(max_bytes), newer]
    rows, count = _rows(script([key], args, r))
    out: list[tuple[bytes, float]] = []
    for member, score in rows:
        if score >= fence:
            created = created_ns_of(member)
            if (score if created is None else created) >= before_ns:
                continue
        out.append((member, score))
        if len(out) == limit:
            break
    return out, count


def read_room_after(
    r: redis.Redis,
    script: Script,
    *,
    key: str,
    limit: int,
    after_ns: int,
    before_ns: int | None,
    cutoff_ns: int,
    max_bytes: int | None,
) -> list[tuple[bytes, float]]:
    """Oldest first: strictly newer than ``after_ns`` (and than ``cutoff_ns``), strictly
    older than ``before_ns`` when given; at most ``limit`` (PROTOCOL.md section 15) and about
    ``max_bytes``. ``script``: ``ROOM_READ``."""
    low = max(float(after_ns) - _SCORE_SLACK, float(cutoff_ns))
    high: float | str = "+inf" if before_ns is None else float(before_ns) + _SCORE_SLACK
    low_fence = repr(after_ns + _SCORE_SLACK)
    high_fence = "" if before_ns is None else repr(before_ns - _SCORE_SLACK)
    most = limit + 2 * _EXTRA_ROWS
    args = ["fwd", high, f"({low}", low_fence, high_fence, limit, most, _budget(max_bytes), ""]
    rows, _ = _rows(script([key], args, r))
    return [row for row in rows if _within(row, after_ns, before_ns)][:limit]


def _budget(max_bytes: int | None) -> int | str:
    return "" if max_bytes is None else max_bytes


def _rows(reply: list[Any]) -> tuple[list[tuple[bytes, float]], int]:
    """``ROOM_READ``'s reply as (member, score) rows, and its count."""
    return [(reply[i], float(reply[i + 1])) for i in range(1, len(reply), 2)], int(reply[0])


def _within(row: tuple[bytes, float], after_ns: int, before_ns: int | None) -> bool:
    """Whether a stored row is strictly between the bounds, by its own ``createTime`` where
    its score is too close to a bound to decide (``ROOM_READ``'s fences)."""
    member, score = row
    created = score
    if score <= after_ns + _SCORE_SLACK or (before_ns is not None and score >= before_ns - _SCORE_SLACK):
        own = created_ns_of(member)
        if own is not None:
            created = own
    return created > after_ns and (before_ns is None or created < before_ns)


def merge_room_after(
    rows: list[tuple[bytes, float]],
    pending: list[tuple[int, bytes]],
    limit: int,
    after_ns: int,
    before_ns: int | None,
    cutoff_ns: int,
) -> list[bytes]:
    """Redis rows (oldest first) plus the queued messages within the bounds, oldest first."""
    seen = {member for member, _ in rows}
    merged = list(rows)
    for created_ns, message in pending:
        if created_ns <= max(after_ns, cutoff_ns) or (before_ns is not None and created_ns >= before_ns):
            continue
        if message not in seen:
            merged.append((message, float(created_ns)))
    merged.sort(key=lambda row: row[1])
    return [member for member, _ in merged[:limit]]


def read_dm(r: redis.Redis, script: Script, *, key: str, limit: int, max_bytes: int | None) -> list[bytes]:
    """The newest ``limit`` entries, newest first, up to about ``max_bytes``. ``script``:
    ``DM_READ``."""
    rows: list[bytes] = script([key], [limit, _budget(max_bytes)], r)
    return rows


# -- merging Redis rows with what is still queued ---------------------------------------------------


def merge_room(
    rows: list[tuple[bytes, float]],
    newer: int,
    pending: list[tuple[int, bytes]],
    limit: int,
    cap: int,
    before_ns: int | None,
    cutoff_ns: int,
) -> list[bytes]:
    """Redis rows plus the queued messages, as Redis will hold them once they are written:
    a queued message newer than ``before`` still pushes old ones past the cap. (A message
    written between the snapshot and the read may count twice there: one fewer row, for
    the few milliseconds of that race.)"""
    seen = {member for member, _ in rows}
    merged = list(rows)
    for created_ns, message in pending:
        if created_ns <= cutoff_ns:
            continue
        if before_ns is not None and created_ns >= before_ns:
            newer += 1
        elif message not in seen:
            merged.append((message, float(created_ns)))
    merged.sort(key=lambda row: row[1], reverse=True)
    return [member for member, _ in merged[: max(0, min(limit, cap - newer))]]


def merge_dm(rows: list[bytes], pending: list[tuple[int, bytes]], limit: int, cutoff_ns: int) -> list[bytes]:
    """Redis rows (newest first, up to the newest past the TTL) plus the queued messages,
    oldest first. Queued messages Redis already holds are the first ones (the writer writes a
    conversation's messages in order, a batch in one script): those up to the last one among
    ``rows`` are not added again, however few rows a byte-bounded read brought."""
    out = []
    for message in rows:
        created = created_ns_of(message)
        if created is not None and created <= cutoff_ns:
            break
        out.append(message)
    out.reverse()
    if pending:
        seen = set(out)
        written = max((i + 1 for i, (_, message) in enumerate(pending) if message in seen), default=0)
        out.extend(m for created, m in pending[written:] if created > cutoff_ns and m not in seen)
    return out[-limit:]


_FRACTION = re.compile(r"(\.\d{6})\d+")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = datetime.resolution


def created_ns_of(message: bytes) -> int | None:
    """A stored message's ``createTime`` in epoch nanoseconds (to the microsecond), or None.
    Reads both this server's form and the original's (RFC 3339, any fraction and offset)."""
    try:
        text = orjson.loads(message).get("createTime")
    except (orjson.JSONDecodeError, AttributeError):
        return None
    if not isinstance(text, str):
        return None
    try:
        moment = datetime.fromisoformat(_FRACTION.sub(r"\1", text))
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return (moment - _EPOCH) // _MICROSECOND * 1000
