"""The Lua scripts of the Redis store: each one is a single atomic step in Redis.

How this works. Matchmaking runs ``aleatoria.matchmaking``'s rules (request_peer's three
rules, set_available ending a match, hangup, disconnect) as one script per command, so no
two requesters, on one instance or many, can ever be handed the same user. The pool is the
original's set ``available:webrtc``; live matches are a hash ``user -> "peer|role"`` (user
ids never contain ``|``: PROTOCOL.md section 3). The hash key carries the pool's name as a
hash tag (``webrtc:matches:{available:webrtc}``) so both keys live in one cluster slot.

Random pick (PROTOCOL.md section 16, "Fair picks"): uniform over the suitable users (pooled,
online, not the requester, not the current peer, not in a live match), without reading the
whole pool. No Redis command samples a set of strings uniformly: ``SRANDMEMBER`` and
``SPOP``, with a positive or negative count or none, draw from the hash table's buckets
(``dictGetFairRandomKey`` picks among a run of up to 15 neighbouring entries), so users whose
buckets follow empty ones come up several times more often than others, the same users for
as long as the table keeps its layout (Redis 7.0, measured: a chi-squared of 664 over 10,000
picks from 200 users, against a 1 % cutoff of 248). And ``SMEMBERS`` costs O(pool) per
request (44 us at 200 users, 2.8 ms at 10,000). So the pool has an index,
``webrtc:pool-index:{available:webrtc}``: a sorted set of the same users, all scored 0, which
``ZRANGE index r r`` reads by rank in O(log n). The pick:
- draws ranks uniformly without replacement (a lazy Fisher-Yates shuffle over 0..m-1: each
  draw is uniform over the ranks not drawn yet) and takes the first suitable user drawn. The
  ranks drawn form a uniformly random ordering of the index, so the first suitable user in
  it is each suitable user with the same probability, whatever the unsuitable ones are;
  when none is suitable, every rank is drawn and the answer is none (exact, never a miss).
  The first draw uses the caller's number (53 bits: scripts must not depend on Redis' own
  seeding); later ones Redis' Lua PRNG seeded from its low 31 bits, uniform up to that
  PRNG's 2^-31 resolution.
- reads one rank per draw for ``PICK_DRAWS`` draws (a typical request needs one: most pooled
  users are suitable), then the whole index at once (only when most users drawn were not).
- The index holds every pooled user: every script that adds to the pool adds to it too
  (``pool_add``; nothing else adds to the pool), and the scripts that take users out of the
  pool (matches, presence's disconnect and reaper) take them out of it too (``pool_remove``).
  ``RedisStore``'s ``set_unavailable`` leaves a stale entry; a drawn entry that is not
  pooled is skipped (it is not suitable) and removed after the pick. The index is
  rebuilt from the pool (O(pool), amortised over the removals that made it stale) when it is
  smaller than the pool (first use on a pool written before it existed, or by hand) or more
  than twice the pool's size plus 32 (so stale entries stay under about half of it).
- Order: the index sorts users by name, so the pick is a function of the caller's number and
  the pool's contents only (tests seed the caller's numbers and get the same picks each run).

Room registry. ``room:members:{room}`` and ``user:rooms:{user}`` as the original kept them,
plus one key of ours, the set ``rooms:active`` of room names, so ``get_rooms`` needs no
keyspace scan. Join and leave update all three in one script, so a room that has members is
always listed; ``rooms`` also drops any listed room whose member set is gone (self-healing,
e.g. after members were written by the original server, which kept no such set). These
scripts build member keys from names (fine on one Redis; Redis Cluster would need them split).

Rooms directory (``list_rooms``, PROTOCOL.md section 11). On one Redis, the sorted set
``rooms:directory`` holds every room of ``rooms:active`` scored by minus its member count, so
``ZRANGE`` reads it most members first and, among equal counts, by name (Redis orders equal
scores by name): the first page costs O(log rooms + limit) whatever the number of rooms.
Join and leave set the score from ``SCARD`` (not an increment: any drift heals at the room's
next join or leave), in the same scripts that keep ``rooms:active``, so the two list the same
rooms; ``list_rooms`` rebuilds the directory from ``rooms:active`` (O(rooms), once) when
their sizes differ (first use on data written before the directory existed, or by an older
version). A ``prefix`` filters while walking the directory in order, chunk by chunk, at most
``DIRECTORY_SCAN`` rooms: a rare prefix costs up to that many entries (measured: under 2 ms of
Redis time for 5,000; the first page without a prefix, 0.04 ms), and a matching room beyond
the ``DIRECTORY_SCAN`` biggest is not found. On a Redis Cluster the member sets live in
other slots than the directory, so no script could keep it exact: there ``list_rooms``
counts every listed room instead (``redis_rooms``), O(rooms).

History writes. A room message is written by the script that publishes it
(``redis_stamp.ROOM_SEND``: Redis stamps its time). ``room_append`` (``redis_stamp``) adds a
batch of a room's messages that the bus did not carry, trims by score to the TTL and by
rank to the cap and sets the expiry, in one call per room and batch.
``dm:{a}:{b}`` is a list, oldest first. ``dm_append`` pushes a batch, caps it,
trims entries older than the TTL from the head (their ``createTime`` parsed here, RFC 3339
with any fraction and offset, as the original also wrote them) and sets the key's expiry.
A ``createTime`` in our own fixed-width form (UTC, six fraction digits) is compared as
text with the cutoff in that form (ARGV[5]) rather than parsed: the parse was a quarter of
the script's time in redis-server (with the calls dropped since: 28.5 -> 16.5 us per call
in ``scripts/redis_message_cost.py``, docs/performance.md "Session 12").
Entries flagged as possibly written already (a retried batch) are skipped when the list
holds them: a retry after a half-executed pipeline never duplicates a DM. History reads,
bounded by the reply's bytes, are ``redis_history``'s scripts.
"""

from __future__ import annotations

from aleatoria.matchmaking import RECENT_MATCH_SECONDS, RECENT_MATCHES

# How many candidates ``request_peer`` reads one by one before it reads the pool's index at
# once (see "Random pick" above). ``RedisStore`` passes it as ARGV[4] under its old name.
PICK_DRAWS = 16
SMALL_POOL = PICK_DRAWS

POOL_KEY = "available:webrtc"
# The search queue's (PROTOCOL.md section 12, ``redis_search``): the pool's members by when
# they were pooled, and each live match's id.
POOLED_KEY = "aleatoria:search:pooled:{available:webrtc}"
MATCH_IDS_KEY = "webrtc:match-ids:{available:webrtc}"
# Beside it, the interests each side of a live match shares with the other (JSON list; only
# matches made on common interests), so a resend carries them too; removed with the match.
MATCH_COMMON_KEY = "webrtc:match-common:{available:webrtc}"
# Each user's last ended matches, for reports (PROTOCOL.md section 13): a list of
# "peer|ended (ms)|match id", newest first, at most RECENT_MATCHES, expiring
# RECENT_MATCH_SECONDS after the last one ended (``end_match`` writes it, ``MATCH_BETWEEN``
# reads it).
ENDED_PREFIX = "aleatoria:ended-matches:{available:webrtc}:"
QUEUE_KEY = "aleatoria:search:queue:{available:webrtc}"
DUE_KEY = "aleatoria:search:due:{available:webrtc}"
PROFILES_KEY = "aleatoria:search:profiles:{available:webrtc}"
TAG_PREFIX = "aleatoria:search:tag:{available:webrtc}:"
# The search queue's indexes (``redis_search``, "Keys"): its searchers by kind (no interests;
# interests, may fall back to anyone; interestsOnly) and by interest, scored like the queue.
QUEUE_BARE_KEY = "aleatoria:search:queue-bare:{available:webrtc}"
QUEUE_OPEN_KEY = "aleatoria:search:queue-open:{available:webrtc}"
QUEUE_ONLY_KEY = "aleatoria:search:queue-only:{available:webrtc}"
QUEUE_TAG_PREFIX = "aleatoria:search:queue-tag:{available:webrtc}:"
RECENT_PREFIX = "aleatoria:search:recent:{available:webrtc}:"
MATCHES_KEY = "webrtc:matches:{available:webrtc}"
POOL_INDEX_KEY = "webrtc:pool-index:{available:webrtc}"
ROOMS_KEY = "rooms:active"
DIRECTORY_KEY = "rooms:directory"
ROOM_MEMBERS_PREFIX = "room:members:"
USER_ROOMS_PREFIX = "user:rooms:"
# Safety (PROTOCOL.md section 13, ``redis_safety``): tagged like the pool, so the pick reads
# them in its own cluster slot.
BLOCKS_PREFIX = "aleatoria:blocks:{available:webrtc}:"
BLOCKED_BY_PREFIX = "aleatoria:blocked-by:{available:webrtc}:"
SHADOW_KEY = "aleatoria:shadow:{available:webrtc}"
BANS_KEY = "aleatoria:bans:{available:webrtc}"
# Each user's new DM partners of the hour (PROTOCOL.md section 16, ``redis_safety``): a sorted
# set partner -> when first written to (ms). Untagged: ``DM_PARTNER`` touches this key alone,
# so on a cluster users spread over the shards.
DM_PARTNERS_PREFIX = "aleatoria:dm-partners:"
# The reports each user filed in its window of an hour (PROTOCOL.md section 13,
# ``redis_safety``): a count expiring when the window ends. Untagged, like the partners.
REPORTS_FILED_PREFIX = "aleatoria:reports-filed:"

MATCH_HELPERS = (
    """
local POOL, MATCHES = KEYS[1], KEYS[2]
local function partner(user)
  local v = redis.call('HGET', MATCHES, user)
  if not v then return nil, nil end
  local sep = string.find(v, '|', 1, true)
  if not sep then return v, 'impolite' end
  return string.sub(v, 1, sep - 1), string.sub(v, sep + 1)
end
local function remember_ended(user, peer, id, ended_ms)
  local key = ENDED_PREFIX .. user
  if redis.call('LPUSH', key, peer .. '|' .. ended_ms .. '|' .. id) > RECENT_MATCHES then
    redis.call('LTRIM', key, 0, RECENT_MATCHES - 1)
  end
  redis.call('PEXPIRE', key, RECENT_MATCH_MS)
end
-- Ends the user's match; both sides' entries go in one HDEL per hash when the peer's side
-- names the user (it always does, unless a repair left one side behind).
local function end_match(user)
  local peer = partner(user)
  if not peer then return false end
  local id = redis.call('HGET', MATCH_IDS_KEY, user)
  local ended_ms = nil
  if id then
    local t = redis.call('TIME')
    ended_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
    remember_ended(user, peer, id, ended_ms)
  end
  local mutual = partner(peer) == user
  local sides = mutual and {user, peer} or {user}
  redis.call('HDEL', MATCHES, unpack(sides))
  redis.call('HDEL', MATCH_IDS_KEY, unpack(sides))
  redis.call('HDEL', MATCH_COMMON_KEY, unpack(sides))
  if mutual and id then remember_ended(peer, user, id, ended_ms) end
  return peer
end
-- A live match told again (PROTOCOL.md section 4): its id and common interests.
local function match_common(user)
  local raw = redis.call('HGET', MATCH_COMMON_KEY, user)
  if not raw then return {} end
  local ok, shared = pcall(cjson.decode, raw)
  if ok and type(shared) == 'table' then return shared end
  return {}
end
""".replace("MATCH_IDS_KEY", repr(MATCH_IDS_KEY))
    .replace("MATCH_COMMON_KEY", repr(MATCH_COMMON_KEY))
    .replace("ENDED_PREFIX", repr(ENDED_PREFIX))
    .replace("RECENT_MATCHES", str(RECENT_MATCHES))
    .replace("RECENT_MATCH_MS", str(int(RECENT_MATCH_SECONDS * 1000)))
)

# The pool's index (see "Random pick"): every addition to the pool goes through pool_add, and
# removals made here through pool_remove. Same hash tag as the pool, so same cluster slot.
POOL_HELPERS = """
local POOL_INDEX = POOL_INDEX_KEY
-- now_ms: Redis's clock in ms if the caller has read it already.
local function pool_add(user, now_ms)
  if redis.call('SADD', POOL, user) == 1 then
    if not now_ms then
      local t = redis.call('TIME')
      now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
    end
    redis.call('ZADD', POOLED_KEY, now_ms, user)
  end
  redis.call('ZADD', POOL_INDEX, 0, user)
end
local function pool_remove(...)
  redis.call('SREM', POOL, ...)
  redis.call('ZREM', POOL_INDEX, ...)
  redis.call('ZREM', POOLED_KEY, ...)
end
""".replace("POOL_INDEX_KEY", repr(POOL_INDEX_KEY)).replace("POOLED_KEY", repr(POOLED_KEY))

# Pooled users' profiles (PROTOCOL.md section 12, ``redis_search``): the profile's JSON and the
# user in the tag set of each of its interests. ``forget_profile`` removes both: with
# ``pool_remove``, what takes a pooled user out for good (a match here; presence's disconnect
# and reaper). Same hash tag as the pool, so same cluster slot.
PROFILE_HELPERS = """
local function profile_of(u)
  local raw = redis.call('HGET', PROFILES_KEY, u)
  if not raw then return nil end
  local ok, p = pcall(cjson.decode, raw)
  if ok and type(p) == 'table' then return p end
  return nil
end
local function forget_profile(u)
  local p = profile_of(u)
  if not p then return end
  if type(p.i) == 'table' then
    for _, tag in ipairs(p.i) do redis.call('SREM', TAG_PREFIX .. tag, u) end
  end
  redis.call('HDEL', PROFILES_KEY, u)
end
""".replace("PROFILES_KEY", repr(PROFILES_KEY)).replace("TAG_PREFIX", repr(TAG_PREFIX))

# The search queue's indexes (``redis_search``, "Keys"): every script that adds a searcher to
# the queue indexes it (``index_searcher``), every one that takes one out unindexes it
# (``unindex_searcher``), with the profile it was queued with (``PROFILES``: a queued user's
# profile changes only when it leaves the queue). ``p``: the profile as decoded from its JSON
# (nil if absent or bad: no interests, like ``redis_search``'s ``profile``).
SEARCHER_INDEX_HELPERS = (
    """
local QUEUE_BARE, QUEUE_OPEN, QUEUE_ONLY = QUEUE_BARE_KEY, QUEUE_OPEN_KEY, QUEUE_ONLY_KEY
local QUEUE_TAG = QUEUE_TAG_PREFIX
local function searcher_kind(p)
  local tags = {}
  if type(p) == 'table' and type(p.i) == 'table' then tags = p.i end
  if #tags == 0 then return QUEUE_BARE, tags end
  if p.o == 1 then return QUEUE_ONLY, tags end
  return QUEUE_OPEN, tags
end
local function index_searcher(u, since, p)
  local kind, tags = searcher_kind(p)
  redis.call('ZADD', kind, since, u)
  for _, t in ipairs(tags) do redis.call('ZADD', QUEUE_TAG .. t, since, u) end
end
local function unindex_searcher(u, p)
  local kind, tags = searcher_kind(p)
  redis.call('ZREM', kind, u)
  for _, t in ipairs(tags) do redis.call('ZREM', QUEUE_TAG .. t, u) end
end
""".replace("QUEUE_BARE_KEY", repr(QUEUE_BARE_KEY))
    .replace("QUEUE_OPEN_KEY", repr(QUEUE_OPEN_KEY))
    .replace("QUEUE_ONLY_KEY", repr(QUEUE_ONLY_KEY))
    .replace("QUEUE_TAG_PREFIX", repr(QUEUE_TAG_PREFIX))
)

# Scale-out (redis_presence): each instance's channel, tagged like the pool so a script on the
# pool's slot may look at (and publish to) it on a Redis Cluster.
INSTANCE_CHANNEL_PREFIX = "aleatoria:instance:{available:webrtc}:"

# Redis' clock in milliseconds, "instance|connection" presence values, and "is this instance
# alive" with a per-call cache: its heartbeat has not expired and its channel has a subscriber
# (a killed process loses its subscription at once, long before its heartbeat expires; a
# frozen one keeps it, and is caught by the heartbeat). Sharded subscribers count on a
# cluster; SHARDNUMSUB is tried under pcall for servers older than Redis 7.
LIVENESS_HELPERS = (
    """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function split(value)
  local sep = string.find(value, '|', 1, true)
  if not sep then return value, '' end
  return string.sub(value, 1, sep - 1), string.sub(value, sep + 1)
end
local alive_cache = {}
local clock = nil
local function alive(instances, inst)
  local known = alive_cache[inst]
  if known ~= nil then return known end
  if not clock then clock = now_ms() end
  local score = redis.call('ZSCORE', instances, inst)
  known = (score and tonumber(score) > clock) or false
  if known then
    local channel = INSTANCE_CHANNEL_PREFIX .. inst
    local listeners = redis.call('PUBSUB', 'NUMSUB', channel)[2]
    if listeners == 0 then
      local ok, sharded = pcall(redis.call, 'PUBSUB', 'SHARDNUMSUB', channel)
      if ok then listeners = sharded[2] end
    end
    known = listeners > 0
  end
  alive_cache[inst] = known
  return known
end
local function online(presence, instances, user)
  local value = redis.call('HGET', presence, user)
  if not value then return false end
  return alive(instances, (split(value)))
end
"""
).replace("INSTANCE_CHANNEL_PREFIX", repr(INSTANCE_CHANNEL_PREFIX))

# KEYS: pool, matches, presence, this instance's users. ARGV: user, instance. Returns the peer
# whose match ended, or nil. A user pooled without presence is registered on this instance
# (only store-level callers pool users who never connected).
SET_AVAILABLE = (
    MATCH_HELPERS
    + POOL_HELPERS
    + """
local ended = end_match(ARGV[1])
pool_add(ARGV[1])
if redis.call('HSETNX', KEYS[3], ARGV[1], ARGV[2] .. '|') == 1 then
  redis.call('SADD', KEYS[4], ARGV[1])
end
return ended
"""
)

# KEYS: pool, matches. ARGV: user, other. For a report (PROTOCOL.md section 13): the id of
# the user's live match if ``other`` is its peer, else of its most recent ended match with
# ``other`` on its record (ENDED_PREFIX) that ended within RECENT_MATCH_SECONDS; '' if none.
MATCH_BETWEEN = (
    (
        MATCH_HELPERS
        + """
local user, other = ARGV[1], ARGV[2]
if partner(user) == other then
  local id = redis.call('HGET', MATCH_IDS_KEY, user)
  if id then return id end
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for _, entry in ipairs(redis.call('LRANGE', ENDED_PREFIX .. user, 0, -1)) do
  local first = string.find(entry, '|', 1, true)
  local second = first and string.find(entry, '|', first + 1, true)
  if second and string.sub(entry, 1, first - 1) == other then
    local ended = tonumber(string.sub(entry, first + 1, second - 1)) or 0
    if now - ended < RECENT_MATCH_MS then return string.sub(entry, second + 1) end
  end
end
return ''
"""
    )
    .replace("MATCH_IDS_KEY", repr(MATCH_IDS_KEY))
    .replace("ENDED_PREFIX", repr(ENDED_PREFIX))
    .replace("RECENT_MATCH_MS", str(int(RECENT_MATCH_SECONDS * 1000)))
)

# KEYS: pool, matches. ARGV: user, peer. Returns 1 if their match was live (and ended).
HANGUP = (
    MATCH_HELPERS
    + """
if partner(ARGV[1]) == ARGV[2] then
  end_match(ARGV[1])
  return 1
end
return 0
"""
)

# KEYS: pool, matches, presence, instances. ARGV: user, current peer ('' for none), uniform
# number in [0, 1) (a Python float's repr: 53 bits), PICK_DRAWS, the caller's clock (unix
# seconds), the profile JSON, the rematch cooldown (ms), the new match's id (section 12),
# then any users not to pick (their own requests follow in the same pipeline).
# Returns {outcome, peer, role, ended, match id, common interests}: outcome 'match', 'resend'
# or 'none'; '' = absent.
# Only online users are picked: presence names an instance whose heartbeat has not expired
# (a dead instance's users stay pooled until it is reaped, but are never picked). The pick
# is uniform over the suitable users: see "Random pick" above for how and why.
REQUEST_PEER = (
    (
        MATCH_HELPERS
        + POOL_HELPERS
        + PROFILE_HELPERS
        + SEARCHER_INDEX_HELPERS
        + LIVENESS_HELPERS
        + """
if redis.replicate_commands then redis.replicate_commands() end
local user, current, rnd = ARGV[1], ARGV[2], tonumber(ARGV[3])
local ended = ''
-- PROTOCOL.md section 12: ARGV[6] the requester's profile JSON ('' for none), ARGV[7] the
-- rematch cooldown (ms), ARGV[8] the new match's id. Another request takes the requester out
-- of the search queue.
local want = nil
if ARGV[6] and ARGV[6] ~= '' then want = cjson.decode(ARGV[6]) end
local cooldown_ms, match_id = tonumber(ARGV[7] or 0) or 0, ARGV[8] or ''
if redis.call('ZREM', QUEUE_KEY, user) == 1 then
  unindex_searcher(user, profile_of(user))
  redis.call('ZREM', DUE_KEY, user)
  redis.call('HDEL', PROFILES_KEY, user)
end
-- Safety (PROTOCOL.md section 13): never a user blocked either way; shadow-banned users
-- only with each other. ARGV[5]: the caller's clock (shadow bans end by it).
local now_s = tonumber(ARGV[5]) or 0
local any_shadow = redis.call('ZCARD', SHADOW_KEY) > 0
local function shadowed(u)
  if not any_shadow then return false end
  local until_s = redis.call('ZSCORE', SHADOW_KEY, u)
  return until_s ~= false and tonumber(until_s) > now_s
end
local my_shadow = shadowed(user)
local my_blocks = {}
for _, b in ipairs(redis.call('SMEMBERS', BLOCKS_PREFIX .. user)) do my_blocks[b] = true end
-- ARGV[9..]: users whose own request follows in the same pipeline (redis_batch): not picked
-- here, or their own request would only get this match again (a crossed request).
for i = 9, #ARGV do my_blocks[ARGV[i]] = true end
local function allowed(c)
  if my_blocks[c] then return false end
  -- A searcher is the queue's (section 12), never an immediate pick, even if a pool entry
  -- survived for it.
  if redis.call('ZSCORE', QUEUE_KEY, c) then return false end
  if redis.call('SISMEMBER', BLOCKS_PREFIX .. c, user) == 1 then return false end
  if want and type(want.l) == 'string' then
    local theirs = profile_of(c)
    if theirs and type(theirs.l) == 'string' and theirs.l ~= want.l then return false end
  end
  return shadowed(c) == my_shadow
end
local mine, role = partner(user)
if mine then
  if mine ~= current then
    return {'resend', mine, role, '', redis.call('HGET', MATCH_IDS_KEY, user) or '', match_common(user)}
  end
  ended = end_match(user)
end
local function each_chunk(command, key, list)
  for i = 1, #list, 1000 do
    redis.call(command, key, unpack(list, i, math.min(i + 999, #list)))
  end
end
local function indexed()
  local n = redis.call('SCARD', POOL)
  local m = redis.call('ZCARD', POOL_INDEX)
  if m >= n and m <= 2 * n + 32 then return m end
  redis.call('DEL', POOL_INDEX)
  local members = redis.call('SMEMBERS', POOL)
  local scored = {}
  for i, member in ipairs(members) do
    scored[2 * i - 1] = 0
    scored[2 * i] = member
  end
  for i = 1, #scored, 1000 do
    redis.call('ZADD', POOL_INDEX, unpack(scored, i, math.min(i + 999, #scored)))
  end
  return #members
end
local function pick()
  local left = indexed()
  local swapped, stale, damaged = {}, {}, {}
  local singles, all = tonumber(ARGV[4]), nil
  local u, seeded = rnd, false
  while left > 0 do
    -- Lazy Fisher-Yates: rank is uniform over the ranks not drawn yet.
    local j = math.min(math.floor(u * left), left - 1)
    local rank = swapped[j] or j
    left = left - 1
    swapped[j] = swapped[left] or left
    local candidate
    if all then
      candidate = all[rank + 1]
    else
      candidate = redis.call('ZRANGE', POOL_INDEX, rank, rank)[1]
      singles = singles - 1
      if singles <= 0 and left > 0 then all = redis.call('ZRANGE', POOL_INDEX, 0, -1) end
    end
    if candidate ~= user and candidate ~= current then
      if redis.call('SISMEMBER', POOL, candidate) == 0 then
        stale[#stale + 1] = candidate
      elseif redis.call('HEXISTS', MATCHES, candidate) == 1 then
        -- A pooled user is never in a match; repair the pool if it ever is.
        damaged[#damaged + 1] = candidate
      elseif allowed(candidate) and online(KEYS[3], KEYS[4], candidate) then
        return candidate, stale, damaged
      end
    end
    if not seeded then
      -- The low 31 bits of the caller's 53 (rnd * 2^22 keeps them as a fraction).
      math.randomseed(math.floor((rnd * 4194304) % 1 * 2147483648))
      seeded = true
    end
    u = math.random()
  end
  return nil, stale, damaged
end
-- With interests: the suitable pooled users sharing the most, uniformly (section 12).
local function suitable(c)
  return c ~= user and c ~= current and redis.call('SISMEMBER', POOL, c) == 1
    and redis.call('HEXISTS', MATCHES, c) == 0 and allowed(c) and online(KEYS[3], KEYS[4], c)
end
local function pick_shared()
  local counts, seen = {}, {}
  for _, tag in ipairs(want.i) do
    for _, c in ipairs(redis.call('SMEMBERS', TAG_PREFIX .. tag)) do
      if not seen[c] then
        seen[c] = true
        local theirs = profile_of(c)
        local set = {}
        if theirs and type(theirs.i) == 'table' then
          for _, t in ipairs(theirs.i) do set[t] = true end
        end
        if not set[tag] or redis.call('SISMEMBER', POOL, c) == 0 then
          redis.call('SREM', TAG_PREFIX .. tag, c)
        else
          local n = 0
          for _, t in ipairs(want.i) do if set[t] then n = n + 1 end end
          counts[n] = counts[n] or {}
          table.insert(counts[n], c)
        end
      end
    end
  end
  local levels = {}
  for n in pairs(counts) do levels[#levels + 1] = n end
  table.sort(levels, function(a, b) return a > b end)
  math.randomseed(math.floor((rnd * 4194304) % 1 * 2147483648))
  for _, n in ipairs(levels) do
    local group = counts[n]
    table.sort(group)
    local left = #group
    while left > 0 do
      local j = math.random(left)
      local c = group[j]
      group[j] = group[left]
      left = left - 1
      if suitable(c) then return c, n end
    end
  end
  return nil, 0
end
local peer, stale, damaged = nil, {}, {}
local shared_count = 0
if want and type(want.i) == 'table' and #want.i > 0 then peer, shared_count = pick_shared() end
if not peer and not (want and want.o == 1 and type(want.i) == 'table' and #want.i > 0) then
  peer, stale, damaged = pick()
end
each_chunk('ZREM', POOL_INDEX, stale)
if #damaged > 0 then
  each_chunk('SREM', POOL, damaged)
  each_chunk('ZREM', POOL_INDEX, damaged)
end
if not peer then return {'none', '', '', ended, ''} end
local shared = {}
if want and type(want.i) == 'table' and #want.i > 0 then
  local theirs = profile_of(peer)
  local set = {}
  if theirs and type(theirs.i) == 'table' then for _, t in ipairs(theirs.i) do set[t] = true end end
  for _, t in ipairs(want.i) do if set[t] then shared[#shared + 1] = t end end
end
forget_profile(user)
forget_profile(peer)
pool_remove(user, peer)
redis.call('HSET', MATCHES, user, peer .. '|impolite', peer, user .. '|polite')
if match_id ~= '' then redis.call('HSET', MATCH_IDS_KEY, user, match_id, peer, match_id) end
if #shared > 0 then
  local encoded = cjson.encode(shared)
  redis.call('HSET', MATCH_COMMON_KEY, user, encoded, peer, encoded)
end
if cooldown_ms > 0 then
  local now = now_ms()
  for _, pair in ipairs({{user, peer}, {peer, user}}) do
    local key = RECENT_PREFIX .. pair[1]
    redis.call('ZADD', key, now, pair[2])
    redis.call('ZREMRANGEBYSCORE', key, '-inf', now - cooldown_ms)
    redis.call('PEXPIRE', key, math.ceil(cooldown_ms))
  end
end
return {'match', peer, 'impolite', ended, match_id, shared}
"""
    )
    .replace("SHADOW_KEY", repr(SHADOW_KEY))
    .replace("BLOCKS_PREFIX", repr(BLOCKS_PREFIX))
    .replace("QUEUE_KEY", repr(QUEUE_KEY))
    .replace("DUE_KEY", repr(DUE_KEY))
    .replace("PROFILES_KEY", repr(PROFILES_KEY))
    .replace("TAG_PREFIX", repr(TAG_PREFIX))
    .replace("RECENT_PREFIX", repr(RECENT_PREFIX))
    .replace("MATCH_IDS_KEY", repr(MATCH_IDS_KEY))
    .replace("MATCH_COMMON_KEY", repr(MATCH_COMMON_KEY))
)

# KEYS: pool, matches, presence, this instance's users[, rooms index, user:rooms:{user}].
# ARGV: user, in pool (0/1), peer ('' for none), role, instance, connection ('' when the user
# is not connected here), instance-users prefix, peer connected here (0/1), sync rooms here
# (1/0), then the user's rooms.
# Makes Redis say what this instance knows about the user (recovery), with two limits:
# - a user not connected here whom another instance registered meanwhile is left alone;
# - a match with a user connected elsewhere is kept only if Redis agrees (that user's partner
#   is this user): each instance decides only about its own users, so two instances that
#   matched differently during an outage can never leave a user in two matches.
# Returns {applied (0/1), instance to evict from, its connection, unconfirmed (0/1), then
# pairs victim, leaver...}: a user connected here whom another instance registered during an
# outage is taken back (the other instance must drop it); ``unconfirmed``: the peer's side
# did not agree, the caller ends the match here; each victim lost its match with leaver here
# and must be told. With sync rooms 0 (Redis Cluster: the room keys live in other slots)
# the caller syncs the rooms itself.
SYNC_USER = (
    MATCH_HELPERS
    + POOL_HELPERS
    + LIVENESS_HELPERS
    + """
local PRESENCE, MINE, INDEX, USER_ROOMS = KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local user, in_pool, peer, role = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local inst, conn, prefix, peer_here = ARGV[5], ARGV[6], ARGV[7], ARGV[8]
local value = redis.call('HGET', PRESENCE, user)
local pinst, pconn = '', ''
if value then pinst, pconn = split(value) end
local evict_inst, evict_conn = '', ''
if conn == '' then
  if pinst ~= '' and pinst ~= inst then
    redis.call('SREM', MINE, user)
    return {0, '', '', 0}
  end
  if value then redis.call('HDEL', PRESENCE, user) end
  redis.call('SREM', MINE, user)
else
  redis.call('HSET', PRESENCE, user, inst .. '|' .. conn)
  redis.call('SADD', MINE, user)
  if pinst ~= '' and pinst ~= inst then
    redis.call('SREM', prefix .. pinst, user)
    evict_inst, evict_conn = pinst, pconn
  end
end
local told = {}
local unconfirmed = 0
if peer ~= '' and peer_here ~= '1' and partner(peer) ~= user then
  unconfirmed = 1
  peer = ''
end
local current = partner(user)
if current and current ~= peer then
  end_match(user)
  if current ~= ARGV[3] then
    told[#told + 1] = current
    told[#told + 1] = user
  end
end
if peer ~= '' then
  local theirs = partner(peer)
  if theirs and theirs ~= user then
    end_match(peer)
    told[#told + 1] = theirs
    told[#told + 1] = peer
  end
  local other = 'polite'
  if role == 'polite' then other = 'impolite' end
  redis.call('HSET', MATCHES, user, peer .. '|' .. role, peer, user .. '|' .. other)
  pool_remove(peer)
end
if in_pool == '1' and peer == '' and unconfirmed == 0 then
  pool_add(user)
else
  pool_remove(user)
end
if ARGV[9] == '1' then
  local DIRECTORY = DIRECTORY_KEY
  local wanted = {}
  for i = 10, #ARGV do wanted[ARGV[i]] = true end
  for _, room in ipairs(redis.call('SMEMBERS', USER_ROOMS)) do
    if not wanted[room] then
      local members = 'room:members:' .. room
      redis.call('SREM', members, user)
      redis.call('SREM', USER_ROOMS, room)
      local left = redis.call('SCARD', members)
      if left == 0 then
        redis.call('SREM', INDEX, room)
        redis.call('ZREM', DIRECTORY, room)
      else
        redis.call('ZADD', DIRECTORY, -left, room)
      end
    end
  end
  for i = 10, #ARGV do
    local members = 'room:members:' .. ARGV[i]
    redis.call('SADD', members, user)
    redis.call('SADD', USER_ROOMS, ARGV[i])
    redis.call('SADD', INDEX, ARGV[i])
    redis.call('ZADD', DIRECTORY, -redis.call('SCARD', members), ARGV[i])
  end
end
return {1, evict_inst, evict_conn, unconfirmed, unpack(told)}
""".replace("DIRECTORY_KEY", repr(DIRECTORY_KEY))
)

# KEYS: room:members:{room}, user:rooms:{user}, rooms index, rooms directory, presence.
# ARGV: room, user, this instance. Returns 0, writing nothing, when presence names the user on
# another instance: that instance took the user over (``CONNECT``) and read its rooms before
# this join, so the membership would belong to no connection and stay for good; this
# instance's connection is being evicted (PROTOCOL.md section 16: a replaced connection leaves
# no room membership). Presence absent (not registered yet, or reaped): the join stands.
JOIN_ROOM = """
local value = redis.call('HGET', KEYS[5], ARGV[2])
if value then
  local sep = string.find(value, '|', 1, true)
  if (sep and string.sub(value, 1, sep - 1) or value) ~= ARGV[3] then return 0 end
end
redis.call('SADD', KEYS[1], ARGV[2])
redis.call('SADD', KEYS[2], ARGV[1])
redis.call('SADD', KEYS[3], ARGV[1])
redis.call('ZADD', KEYS[4], -redis.call('SCARD', KEYS[1]), ARGV[1])
return 1
"""

# KEYS: room:members:{room}, user:rooms:{user}, rooms index, rooms directory. ARGV: room, user.
LEAVE_ROOM = """
redis.call('SREM', KEYS[1], ARGV[2])
redis.call('SREM', KEYS[2], ARGV[1])
local left = redis.call('SCARD', KEYS[1])
if left == 0 then
  redis.call('SREM', KEYS[3], ARGV[1])
  redis.call('ZREM', KEYS[4], ARGV[1])
else
  redis.call('ZADD', KEYS[4], -left, ARGV[1])
end
return 1
"""

# KEYS: rooms index. Returns the listed rooms that have members (drops the others, from the
# directory too).
ROOMS = """
local out = {}
for _, room in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if redis.call('EXISTS', 'room:members:' .. room) == 1 then
    out[#out + 1] = room
  else
    redis.call('SREM', KEYS[1], room)
    redis.call('ZREM', DIRECTORY_KEY, room)
  end
end
return out
""".replace("DIRECTORY_KEY", repr(DIRECTORY_KEY))

# KEYS: rooms directory, rooms index. ARGV: limit, prefix ('' for none), DIRECTORY_SCAN.
# Returns room, score pairs (score = minus the member count), most members first, then by name.
# See "Rooms directory" above.
LIST_ROOMS = """
local DIRECTORY, INDEX = KEYS[1], KEYS[2]
local limit, prefix, bound = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3])
if redis.call('ZCARD', DIRECTORY) ~= redis.call('SCARD', INDEX) then
  redis.call('DEL', DIRECTORY)
  for _, room in ipairs(redis.call('SMEMBERS', INDEX)) do
    local count = redis.call('SCARD', 'room:members:' .. room)
    if count > 0 then
      redis.call('ZADD', DIRECTORY, -count, room)
    else
      redis.call('SREM', INDEX, room)
    end
  end
end
if prefix == '' then return redis.call('ZRANGE', DIRECTORY, 0, limit - 1, 'WITHSCORES') end
-- Names only, compared in place (string.find, plain): a third of the cost of reading scores
-- and cutting a string per room; the few scores wanted are read at the end.
local found, find, start, chunk = {}, string.find, 0, 500
while start < bound and #found < limit do
  local names = redis.call('ZRANGE', DIRECTORY, start, math.min(start + chunk, bound) - 1)
  for i = 1, #names do
    if find(names[i], prefix, 1, true) == 1 then
      found[#found + 1] = names[i]
      if #found == limit then break end
    end
  end
  if #names < chunk then break end
  start = start + chunk
end
local out = {}
for i, room in ipairs(found) do
  out[2 * i - 1] = room
  out[2 * i] = redis.call('ZSCORE', DIRECTORY, room)
end
return out
"""

# KEYS: room:members:{room}. ARGV: limit. Returns {count, {up to limit members}}. A room of
# more than ``limit`` members is read with SSCAN until ``limit`` are found (bounded work
# whatever its size; which members that lists is up to the set's layout; SSCAN may repeat a
# member, hence ``seen``), a smaller one whole.
ROOM_MEMBERS = """
local count, limit = redis.call('SCARD', KEYS[1]), tonumber(ARGV[1])
if count <= limit then return {count, redis.call('SMEMBERS', KEYS[1])} end
local out, seen, cursor = {}, {}, '0'
repeat
  local page = redis.call('SSCAN', KEYS[1], cursor, 'COUNT', limit)
  cursor = page[1]
  for _, member in ipairs(page[2]) do
    if #out < limit and not seen[member] then
      seen[member] = true
      out[#out + 1] = member
    end
  end
until cursor == '0' or #out >= limit
return {count, out}
"""

# KEYS: presence, instances, pool, matches. ARGV: instance-users prefix. Returns {online,
# searching, in calls}: connected users (presence, less those of instances that are not alive
# and not reaped yet: they are offline for everyone already), pooled users, and users in a
# live match (the hash holds both sides). O(instances). A dead instance's pooled and matched
# users count until it is reaped (presence_ttl + heartbeat_interval at most).
STATS = (
    LIVENESS_HELPERS
    + """
local online = redis.call('HLEN', KEYS[1])
for _, inst in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
  if not alive(KEYS[2], inst) then online = online - redis.call('SCARD', ARGV[1] .. inst) end
end
local searching = redis.call('SCARD', KEYS[3]) + redis.call('ZCARD', QUEUE_KEY)
return {math.max(online, 0), searching, redis.call('HLEN', KEYS[4])}
"""
).replace("QUEUE_KEY", repr(QUEUE_KEY))

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
local cutoff_text = ARGV[5]
local length = 0
for i = 6, #ARGV do
  if i - 5 > suspects or not redis.call('LPOS', key, ARGV[i], 'RANK', -1, 'MAXLEN', cap) then
    length = redis.call('RPUSH', key, ARGV[i])
  end
end
if length == 0 or length > cap then redis.call('LTRIM', key, -cap, -1) end
while true do
  local head = redis.call('LINDEX', key, 0)
  if not head then break end
  local ok, message = pcall(cjson.decode, head)
  local ts = ok and type(message) == 'table' and message.createTime
  if type(ts) ~= 'string' then break end
  if #ts == 27 and string.find(ts, '^%d%d%d%d%-%d%d%-%d%dT%d%d:%d%d:%d%d%.%d%d%d%d%d%dZ$') then
    -- Ours (UTC, microseconds): fixed width, so the text orders as the time does.
    if ts > cutoff_text then break end
  else
    local t = epoch_seconds(ts)
    if t == nil or t > cutoff then break end
  end
  redis.call('LPOP', key)
end
redis.call('PEXPIRE', key, ttl)  -- a no-op when the trim emptied the list
return 1
"""

# Safety (``redis_safety``): KEYS blocks:<blocker>, blocked-by:<blocked>; ARGV blocker,
# blocked, the most blocks a user may have. 1: blocked (or was already), 0: at the limit.
BLOCK = """
if redis.call('SISMEMBER', KEYS[1], ARGV[2]) == 1 then return 1 end
if redis.call('SCARD', KEYS[1]) >= tonumber(ARGV[3]) then return 0 end
redis.call('SADD', KEYS[1], ARGV[2])
redis.call('SADD', KEYS[2], ARGV[1])
return 1
"""

# Safety (``redis_safety``), at each handshake: KEYS bans, blocked-by:<user>; ARGV user.
# Returns {the ban's JSON or nil, the users who blocked this one}. A script (not two reads)
# so that handshakes of one scheduler pass share one round trip (``redis_batch``).
ADMIT = """
return {redis.call('HGET', KEYS[1], ARGV[1]), redis.call('SMEMBERS', KEYS[2])}
"""

# New DM partners (PROTOCOL.md section 16, ``redis_safety``): KEYS dm-partners:<user>; ARGV
# partner, now (ms, the caller's wall clock), the window (ms: an hour), the limit. Trims the
# set to the window, then: the partner is there -> how long ago (ms) it was first written to;
# else the user has ``limit`` partners already -> -1 (nothing added); else adds it at now,
# sets the key to expire a window later, and returns 0. One script, so two connections or
# instances of one user racing for its last partner cannot both pass.
DM_PARTNER = """
local key, partner = KEYS[1], ARGV[1]
local now, window = tonumber(ARGV[2]), tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
local first = redis.call('ZSCORE', key, partner)
if first then return math.max(0, now - tonumber(first)) end
if redis.call('ZCARD', key) >= tonumber(ARGV[4]) then return -1 end
redis.call('ZADD', key, now, partner)
redis.call('PEXPIRE', key, window)
return 0
"""

# Reports filed (PROTOCOL.md section 13, ``redis_safety``): KEYS reports-filed:<user>; ARGV the
# window (ms: an hour), the limit. The key is the count of the user's window, and expires when
# the window ends: with none, this report opens one (1 and the window); with ``limit`` counted,
# nothing is counted (-1 and the window's ms left); else it is counted (the count and the ms
# left). One script, so two connections or instances of one user cannot both pass the limit.
REPORT_COUNT = """
local key, window, limit = KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2])
local count = tonumber(redis.call('GET', key) or '0')
if count == 0 then
  redis.call('SET', key, 1, 'PX', window)
  return {1, window}
end
if count >= limit then return {-1, redis.call('PTTL', key)} end
return {redis.call('INCR', key), redis.call('PTTL', key)}
"""
