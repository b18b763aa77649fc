"""The Lua scripts of the Redis store: each one is a single atomic step in Redis.

How this works. Matchmaking runs ``aleatoria.matchmaking``'s rules (request_peer's three
rules, set_available ending a match, hangup, disconnect) as one script per command, so no
two requesters, on one instance or many, can ever be handed the same user. The pool is the
original's set ``available:webrtc``; live matches are a hash ``user -> "peer|role"`` (user
ids never contain ``|``: PROTOCOL.md section 3). The hash key carries the pool's name as a
hash tag (``webrtc:matches:{available:webrtc}``) so both keys live in one cluster slot.

Random pick. ``request_peer`` gets a uniform random number from the caller (scripts must not
depend on Redis' own seeding). With at most ``SMALL_POOL`` pooled users it reads the whole
pool and picks uniformly among the allowed ones (exact). Above that it draws 3 distinct users
with ``SRANDMEMBER`` and picks uniformly among the allowed ones of the sample: at most two
users are excluded (requester, current peer), so the sample always holds one, and by
symmetry every allowed user is equally likely, as far as Redis' sampling of a large set is
fair (its "fair random key" sampling: close to uniform, not exact).

Room registry. ``room:members:{room}`` and ``user:rooms:{user}`` as the original kept them,
plus one key of ours, the set ``rooms:active`` of room names, so ``get_rooms`` needs no
keyspace scan. Join and leave update all three in one script, so a room that has members is
always listed; ``rooms`` also drops any listed room whose member set is gone (self-healing,
e.g. after members were written by the original server, which kept no such set). These
scripts build member keys from names (fine on one Redis; Redis Cluster would need them split).

History writes. ``room_append`` adds a batch of a room's messages, trims by score to the TTL
and by rank to the cap and sets the expiry, in one call per room and batch.
``dm:{a}:{b}`` is a list, oldest first. ``dm_append`` pushes a batch, caps it,
trims entries older than the TTL from the head (their ``createTime`` parsed here, RFC 3339
with any fraction and offset, as the original also wrote them) and sets the key's expiry.
Entries flagged as possibly written already (a retried batch) are skipped when the list
holds them: a retry after a half-executed pipeline never duplicates a DM.
"""

from __future__ import annotations

SMALL_POOL = 64

POOL_KEY = "available:webrtc"
MATCHES_KEY = "webrtc:matches:{available:webrtc}"
ROOMS_KEY = "rooms:active"
ROOM_MEMBERS_PREFIX = "room:members:"
USER_ROOMS_PREFIX = "user:rooms:"

_MATCH_HELPERS = """
local POOL, MATCHES = KEYS[1], KEYS[2]
local function partner(user)
  local v = redis.call('HGET', MATCHES, user)
  if not v then return nil, nil end
  local sep = string.find(v, '|', 1, true)
  if not sep then return v, 'impolite' end
  return string.sub(v, 1, sep - 1), string.sub(v, sep + 1)
end
local function end_match(user)
  local peer = partner(user)
  if not peer then return false end
  redis.call('HDEL', MATCHES, user)
  if partner(peer) == user then redis.call('HDEL', MATCHES, peer) end
  return peer
end
"""

# KEYS: pool, matches. ARGV: user. Returns the peer whose match ended, or nil.
SET_AVAILABLE = (
    _MATCH_HELPERS
    + """
local ended = end_match(ARGV[1])
redis.call('SADD', POOL, ARGV[1])
return ended
"""
)

# KEYS: pool, matches. ARGV: user. Returns the peer whose match ended, or nil.
USER_GONE = (
    _MATCH_HELPERS
    + """
redis.call('SREM', POOL, ARGV[1])
return end_match(ARGV[1])
"""
)

# KEYS: pool, matches. ARGV: user, peer. Returns 1 if their match was live (and ended).
HANGUP = (
    _MATCH_HELPERS
    + """
if partner(ARGV[1]) == ARGV[2] then
  end_match(ARGV[1])
  return 1
end
return 0
"""
)

# KEYS: pool, matches. ARGV: user, current peer ('' for none), uniform number in [0, 1).
# Returns {outcome, peer, role, ended}: outcome 'match', 'resend' or 'none'; '' = absent.
REQUEST_PEER = (
    _MATCH_HELPERS
    + """
if redis.replicate_commands then redis.replicate_commands() end
local user, current, rnd = ARGV[1], ARGV[2], tonumber(ARGV[3])
local ended = ''
local mine, role = partner(user)
if mine then
  if mine ~= current then return {'resend', mine, role, ''} end
  ended = end_match(user)
end
local function pick()
  for _ = 1, 8 do
    local n = redis.call('SCARD', POOL)
    if n == 0 then return nil end
    local sample
    if n <= tonumber(ARGV[4]) then
      sample = redis.call('SMEMBERS', POOL)
      table.sort(sample)
    else
      sample = redis.call('SRANDMEMBER', POOL, 3)
    end
    local allowed = {}
    for _, candidate in ipairs(sample) do
      if candidate ~= user and candidate ~= current then allowed[#allowed + 1] = candidate end
    end
    if #allowed == 0 then return nil end
    local chosen = allowed[math.floor(rnd * #allowed) + 1]
    if redis.call('HEXISTS', MATCHES, chosen) == 0 then return chosen end
    -- A pooled user is never in a match; repair the pool if it ever is, and draw again.
    redis.call('SREM', POOL, chosen)
  end
  return nil
end
local peer = pick()
if not peer then return {'none', '', '', ended} end
redis.call('SREM', POOL, user, peer)
redis.call('HSET', MATCHES, user, peer .. '|impolite', peer, user .. '|polite')
return {'match', peer, 'impolite', ended}
"""
)

# KEYS: pool, matches, rooms index, user:rooms:{user}.
# ARGV: user, in pool (0/1), peer ('' for none), role, then the user's rooms.
# Makes Redis say exactly what this instance knows about the user (recovery).
SYNC_USER = (
    _MATCH_HELPERS
    + """
local INDEX, USER_ROOMS = KEYS[3], KEYS[4]
local user, in_pool, peer, role = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local other = 'polite'
if role == 'polite' then other = 'impolite' end
if partner(user) ~= (peer ~= '' and peer or nil) then end_match(user) end
if peer ~= '' then
  if partner(peer) ~= user then end_match(peer) end
  redis.call('HSET', MATCHES, user, peer .. '|' .. role, peer, user .. '|' .. other)
  redis.call('SREM', POOL, peer)
end
if in_pool == '1' and peer == '' then
  redis.call('SADD', POOL, user)
else
  redis.call('SREM', POOL, user)
end
local wanted = {}
for i = 5, #ARGV do wanted[ARGV[i]] = true end
for _, room in ipairs(redis.call('SMEMBERS', USER_ROOMS)) do
  if not wanted[room] then
    local members = 'room:members:' .. room
    redis.call('SREM', members, user)
    redis.call('SREM', USER_ROOMS, room)
    if redis.call('SCARD', members) == 0 then redis.call('SREM', INDEX, room) end
  end
end
for i = 5, #ARGV do
  redis.call('SADD', 'room:members:' .. ARGV[i], user)
  redis.call('SADD', USER_ROOMS, ARGV[i])
  redis.call('SADD', INDEX, ARGV[i])
end
return 1
"""
)

# KEYS: room:members:{room}, user:rooms:{user}, rooms index. ARGV: room, user.
JOIN_ROOM = """
redis.call('SADD', KEYS[1], ARGV[2])
redis.call('SADD', KEYS[2], ARGV[1])
redis.call('SADD', KEYS[3], ARGV[1])
return 1
"""

# KEYS: room:members:{room}, user:rooms:{user}, rooms index. ARGV: room, user.
LEAVE_ROOM = """
redis.call('SREM', KEYS[1], ARGV[2])
redis.call('SREM', KEYS[2], ARGV[1])
if redis.call('SCARD', KEYS[1]) == 0 then redis.call('SREM', KEYS[3], ARGV[1]) end
return 1
"""

# KEYS: rooms index. Returns the listed rooms that have members (drops the others).
ROOMS = """
local out = {}
for _, room in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if redis.call('EXISTS', 'room:members:' .. room) == 1 then
    out[#out + 1] = room
  else
    redis.call('SREM', KEYS[1], room)
  end
end
return out
"""

# KEYS: room:messages:{room}. ARGV: cutoff (epoch ns), cap, ttl (ms), then score/message
# pairs. One call per room and batch: cheaper to send and parse than four commands.
ROOM_APPEND = """
local key = KEYS[1]
for i = 4, #ARGV, 2 do redis.call('ZADD', key, ARGV[i], ARGV[i + 1]) end
redis.call('ZREMRANGEBYSCORE', key, '-inf', ARGV[1])
redis.call('ZREMRANGEBYRANK', key, 0, -(tonumber(ARGV[2]) + 1))
if redis.call('EXISTS', key) == 1 then redis.call('PEXPIRE', key, ARGV[3]) end
return 1
"""

# KEYS: dm:{a}:{b}. ARGV: cutoff (epoch seconds), cap, ttl (ms), how many of the messages
# may already be in the list (a prefix of them), then the messages, oldest first.
DM_APPEND = """
local function days_from_civil(y, m, d)
  if m <= 2 then y = y - 1 end
  local era = math.floor(y / 400)
  local yoe = y - era * 400
  local doy = math.floor((153 * ((m + 9) % 12) + 2) / 5) + d - 1
  local doe = yoe * 365 + math.floor(yoe / 4) - math.floor(yoe / 100) + doy
  return era * 146097 + doe - 719468
end
local function epoch_seconds(ts)
  local y, mo, d, h, mi, s, rest = string.match(ts,
    '^(%d%d%d%d)%-(%d%d)%-(%d%d)[Tt ](%d%d):(%d%d):(%d%d)(.*)$')
  if not y then return nil end
  local t = days_from_civil(tonumber(y), tonumber(mo), tonumber(d)) * 86400
    + tonumber(h) * 3600 + tonumber(mi) * 60 + tonumber(s)
  local frac, zone = string.match(rest, '^%.(%d+)(.*)$')
  if frac then t = t + tonumber('0.' .. frac) else zone = rest end
  if zone == 'Z' or zone == 'z' then return t end
  local sign, zh, zm = string.match(zone, '^([%+%-])(%d%d):(%d%d)$')
  if not sign then return nil end
  local offset = tonumber(zh) * 3600 + tonumber(zm) * 60
  if sign == '+' then return t - offset end
  return t + offset
end
local key = KEYS[1]
local cutoff, cap, ttl, suspects = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4])
for i = 5, #ARGV do
  if i - 4 > suspects or not redis.call('LPOS', key, ARGV[i], 'RANK', -1, 'MAXLEN', cap) then
    redis.call('RPUSH', key, ARGV[i])
  end
end
redis.call('LTRIM', key, -cap, -1)
while true do
  local head = redis.call('LINDEX', key, 0)
  if not head then break end
  local ok, message = pcall(cjson.decode, head)
  local t = nil
  if ok and type(message) == 'table' and type(message.createTime) == 'string' then
    t = epoch_seconds(message.createTime)
  end
  if t == nil or t > cutoff then break end
  redis.call('LPOP', key)
end
if redis.call('EXISTS', key) == 1 then redis.call('PEXPIRE', key, ttl) end
return 1
"""
