"""Reading history from Redis: the queries, and merging in what the writer still holds.

Room history is a sorted set scored by createTime in epoch nanoseconds, as the original
stored it. Scores are doubles, exact to 256 ns at today's epoch values, so "strictly older
than ``before``" is decided by the score far from the bound and by the message's own
``createTime`` within ``_SCORE_SLACK`` of it (``before`` comes with microsecond precision).
DM history is a list, oldest first; entries past the TTL may still sit at its head until the
next write trims them, so reads filter them by ``createTime``.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime

import orjson
import redis

_SCORE_SLACK = 1024.0
_EXTRA_ROWS = 16


def read_room(
    r: redis.Redis, *, key: str, limit: int, before_ns: int | None, cutoff_ns: int, count_newer: bool
) -> tuple[list[tuple[bytes, float]], int]:
    """Newest first, newer than ``cutoff_ns``, strictly older than ``before_ns``; and, when
    ``count_newer``, how many stored messages are not older than ``before_ns``."""
    low = f"({cutoff_ns}"
    if before_ns is None:
        rows: list[tuple[bytes, float]] = r.zrevrangebyscore(  # type: ignore[assignment]
            key, "+inf", low, start=0, num=limit, withscores=True
        )
        return rows, 0
    pipe = r.pipeline(transaction=False)
    pipe.zrevrangebyscore(key, before_ns, low, start=0, num=limit + _EXTRA_ROWS, withscores=True)
    if count_newer:
        pipe.zcount(key, before_ns, "+inf")
    replies = pipe.execute()
    out: list[tuple[bytes, float]] = []
    fence = float(before_ns) - _SCORE_SLACK
    for member, score in replies[0]:
        if score >= fence:
            created = created_ns_of(member)
            if (score if created is None else created) >= before_ns:
                continue
        out.append((member, score))
        if len(out) == limit:
            break
    return out, replies[1] if count_newer else 0


def read_room_after(
    r: redis.Redis, *, key: str, limit: int, after_ns: int, before_ns: int | None, cutoff_ns: int
) -> list[tuple[bytes, float]]:
    """Oldest first: strictly newer than ``after_ns`` (and than ``cutoff_ns``), strictly
    older than ``before_ns`` when given; at most ``limit`` (PROTOCOL.md section 15)."""
    low = max(float(after_ns) - _SCORE_SLACK, float(cutoff_ns))
    high: float | str = "+inf" if before_ns is None else float(before_ns) + _SCORE_SLACK
    rows: list[tuple[bytes, float]] = r.zrangebyscore(  # type: ignore[assignment]
        key, f"({low}", high, start=0, num=limit + 2 * _EXTRA_ROWS, withscores=True
    )
    return [row for row in rows if _within(row, after_ns, before_ns)][:limit]


def _within(row: tuple[bytes, float], after_ns: int, before_ns: int | None) -> bool:
    """Whether a stored row is strictly between the bounds, by its own ``createTime`` where
    its score is too close to a bound to decide."""
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


def read_dm(r: redis.Redis, *, key: str, limit: int) -> list[bytes]:
    rows: list[bytes] = r.lrange(key, -limit, -1)  # type: ignore[assignment]
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
    out = []
    for message in rows:
        created = created_ns_of(message)
        if created is None or created > cutoff_ns:
            out.append(message)
    if pending:
        seen = set(out)
        out.extend(m for created, m in pending if created > cutoff_ns and m not in seen)
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
