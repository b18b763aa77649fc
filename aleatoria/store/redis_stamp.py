"""A room message's time, stamped by Redis: history in its live order across instances.

Why. A client pages forward through a room's history from the last message it saw live
(``get_recent_messages {after}``, PROTOCOL.md section 15), so history must order messages
as they were delivered. When each instance stamped ``createTime`` itself, two instances'
messages could reach Redis' channel in one order and carry times in the other (a red-team
run: 12-19 inversions in 200 messages), and paging forward skipped them.

How this works. ``ROOM_SEND`` is one script call for a room's messages of one pipeline:
it takes Redis' clock, never below the room's newest message (one microsecond past it),
writes that time into each message's ``createTime`` (one microsecond apart), adds each to
the room's history and publishes it on the room's channel, then trims the history as
``room_append`` does. Scripts run one at a time, so every
instance receives a room's messages in the order of their times, and history holds them in
that order. On a Redis Cluster the room's channel carries its history key as hash tag
(``redis_bus.room_channel``): one slot.

The instance's own stamp stays in the message until the script replaces it: it is what the
local members get when the bus gives up on the message (Redis stalled or failing, see
``redis_echo``), and what the fallback writes to history. Echoes are therefore matched by
the message without its time (``echo_key``). A fallback write may meet the copy the script
wrote after all (a pipeline that failed after running, or that a hung Redis ran when it
resumed, however long after): ``room_append`` skips a message whose copy, with another
time, is near it or later (``DEDUP_WINDOW_NS``, ``DEDUP_SCAN``).

A message's ``createTime`` is its last field, in ``codec.now``'s fixed-width form
(``"createTime":"2026-12-05T04:33:10.123456Z"}``), so the script replaces a fixed tail.
"""

from __future__ import annotations

# The tail ``ROOM_SEND`` replaces: the time (27 characters) and the closing ``"}``.
_TIME_LENGTH = 27
TAIL = _TIME_LENGTH + 2
_FIELD = b'"createTime":"'

# A fallback write of a room message is skipped when a copy with another time is at most
# this many nanoseconds before it, or any time after (Redis' time when it ran the script:
# a 9 s hang stored both copies when only 5 s after counted), among the first ``DEDUP_SCAN``
# messages from there (a busier room may keep both copies: a stall or failure in a room of
# over 50 messages a second).
DEDUP_WINDOW_NS = 5_000_000_000
DEDUP_SCAN = 512


def stampable(message: bytes) -> bool:
    """Whether ``message`` ends with a ``createTime`` in the fixed form the script replaces."""
    return message[-TAIL - len(_FIELD) : -TAIL] == _FIELD and message[-3:] == b'Z"}'


def echo_key(message: bytes) -> bytes:
    """A room message without its time: the same for the instance's stamp and Redis'."""
    return message[:-TAIL]


# Microseconds since the epoch -> ``codec.rfc3339``'s text (days to a civil date: H. Hinnant's
# algorithm). Lua numbers are doubles: exact for microseconds since the epoch until 2255.
STAMP_HELPERS = """
local function rfc3339(us)
  local s = math.floor(us / 1000000)
  local frac = us - s * 1000000
  local days = math.floor(s / 86400)
  local sod = s - days * 86400
  local z = days + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524)
    - math.floor(doe / 146096)) / 365)
  local y = yoe + era * 400
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local d = doy - math.floor((153 * mp + 2) / 5) + 1
  local m = mp < 10 and mp + 3 or mp - 9
  if m <= 2 then y = y + 1 end
  return string.format('%04d-%02d-%02dT%02d:%02d:%02d.%06dZ', y, m, d,
    math.floor(sod / 3600), math.floor((sod % 3600) / 60), sod % 60, frac)
end
"""

# KEYS: room:messages:{room}. ARGV: the room's channel, the publish command (PUBLISH or
# SPUBLISH), cutoff (epoch ns), cap, ttl (ms), then the messages, in order (the bus sends a
# room's messages of one pipeline together: most of a call's cost is the call's own, and
# the trims'). Returns the subscribers the last publish reached.
ROOM_SEND = (
    STAMP_HELPERS
    + """
local key = KEYS[1]
local clock = redis.call('TIME')
local us = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local newest = redis.call('ZREVRANGE', key, 0, 0, 'WITHSCORES')
if #newest > 0 then
  -- A score is a double of nanoseconds (exact to 256 ns): rounding up, then one more
  -- microsecond, is past the newest message's own time whichever way it was rounded.
  local next_us = math.ceil(tonumber(newest[2]) / 1000) + 1
  if next_us > us then us = next_us end
end
local reached = 0
for i = 6, #ARGV do
  local message = ARGV[i]
  message = string.sub(message, 1, #message - TAIL) .. rfc3339(us) .. '"}'
  redis.call('ZADD', key, string.format('%.0f', us * 1000), message)
  reached = redis.call(ARGV[2], ARGV[1], message)
  us = us + 1
end
redis.call('ZREMRANGEBYSCORE', key, '-inf', ARGV[3])
redis.call('ZREMRANGEBYRANK', key, 0, -(tonumber(ARGV[4]) + 1))
redis.call('PEXPIRE', key, ARGV[5])
return reached
""".replace("TAIL", str(TAIL))
)

# KEYS: room:messages:{room}. ARGV: cutoff (epoch ns), cap, ttl (ms), then score/message
# pairs. One call per room and batch. A message whose copy with another time is already
# near it or later is skipped (see the module doc): it was sent by ``ROOM_SEND`` after all.
ROOM_APPEND = (
    """
local key = KEYS[1]
local function held(score, message)
  local n = #message
  if n < TAIL then return false end
  local head = string.sub(message, 1, n - TAIL)
  local low = string.format('%.0f', tonumber(score) - WINDOW)
  for _, other in ipairs(redis.call('ZRANGEBYSCORE', key, low, '+inf', 'LIMIT', 0, SCAN)) do
    if #other == n and string.sub(other, 1, n - TAIL) == head then return true end
  end
  return false
end
for i = 4, #ARGV, 2 do
  if not held(ARGV[i], ARGV[i + 1]) then redis.call('ZADD', key, ARGV[i], ARGV[i + 1]) end
end
redis.call('ZREMRANGEBYSCORE', key, '-inf', ARGV[1])
redis.call('ZREMRANGEBYRANK', key, 0, -(tonumber(ARGV[2]) + 1))
if redis.call('EXISTS', key) == 1 then redis.call('PEXPIRE', key, ARGV[3]) end
return 1
""".replace("TAIL", str(TAIL))
    .replace("WINDOW", str(DEDUP_WINDOW_NS))
    .replace("SCAN", str(DEDUP_SCAN))
)
