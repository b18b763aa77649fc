"""The search queue in Redis (PROTOCOL.md section 12): ``aleatoria.search``'s rules as Lua.

How this works. Each step of the search is one script, so a match is decided atomically
across instances exactly as ``search.on_change`` decides it in memory:
- ``AVAILABLE`` pools a user (what ``SET_AVAILABLE`` did) with its profile; the oldest
  compatible searcher gets it.
- ``SEARCH`` queues a searcher and runs ``on_change`` for it; ``CANCEL`` takes it out.
- ``TICK`` (every instance, every ``search_tick`` seconds) looks at the searchers that are
  due (oldest first): a search that timed out leaves the queue and is returned (its
  ``no_peer_available`` is sent by the instance that ran the tick); any other runs
  ``on_change`` again (its interest wait or a cooldown ran out, or a block between it and
  another user was removed: ``unblock_user`` makes both due at once). Two instances ticking at
  once cannot both take an event: the first script removes or re-schedules it.
- Matches come back from the script that made them (impolite, polite, id, common interests,
  the searchers who fell back, the waits): that instance announces them (``searching``).

Keys, all tagged ``{available:webrtc}`` like the pool (one cluster slot, so every script
reads them with the pool, the matches and the safety keys):
- ``aleatoria:search:queue:{...}``: sorted set of searchers, scored by Redis' ``TIME`` (ms)
  at enqueue -- oldest first whatever instance queued them;
- its indexes, sorted sets scored like it: ``aleatoria:search:queue-tag:{...}:<interest>``,
  the searchers who gave the interest; and each searcher in one of three by kind:
  ``queue-bare`` (no interests: may match anyone), ``queue-open`` (interests, may fall back
  to anyone once its interest wait has passed) and ``queue-only`` (interestsOnly). Every
  script that adds to the queue or takes from it keeps them (``index_searcher`` and
  ``unindex_searcher`` in ``redis_scripts``: here, ``CANCEL``, and ``REQUEST_PEER``, whose
  request takes its user out of the queue), with the profile the searcher was queued with.
  If the three kinds do not add up to the queue (a queue written by an older version), the
  next step rebuilds them from it, O(searchers), once; an entry of a searcher no longer
  queued is dropped when a step meets it;
- ``aleatoria:search:due:{...}``: sorted set, when each searcher must be looked at again
  (a wait, timeout or cooldown 1 ms after its end: the ms of ``TIME`` are truncated, so
  only a difference over the duration shows it has passed, and none may end early);
- ``aleatoria:search:profiles:{...}``: hash user -> profile JSON (``Profile.to_json``), for
  searchers and pooled users alike (a user is one or the other);
- ``aleatoria:search:pooled:{...}``: sorted set of pooled users by when they were pooled
  (kept by ``pool_add``/``pool_remove``; a stale entry is skipped and removed);
- ``aleatoria:search:tag:{...}:<interest>``: set of the pooled users who gave the interest
  (stale entries are removed when met);
- ``aleatoria:search:recent:{...}:<user>``: sorted set partner -> when matched, trimmed to
  the cooldown and expiring with it;
- ``webrtc:match-ids:{available:webrtc}``: hash user -> its live match's id, and
  ``webrtc:match-common:{available:webrtc}``: hash user -> the interests its live match was
  made on (JSON list; only when there are some), so a resend carries the same id and common
  interests; both removed with the match.

Cost. ``on_change`` reads the queue through its indexes, so a step looks only at the
searchers who may be compatible with the user ``x`` it decides for: those sharing one of its
interests and, when ``x`` may match without a common interest, those who may too (no
interests, or an interest wait passed: since + wait < now, a range of ``queue-open``'s
scores). These are exactly the ones ``compatible`` can accept, and a walk merges them from
their sorted sets oldest first (``ZRANGEBYSCORE``, a page at a time), so the order of
``search.on_change`` is kept: the first compatible older searcher gets ``x``; else ``x``
takes the best (``better``) of the newer ones sharing an interest, the pooled users sharing
one and, when none shares one, the first compatible of the newer searchers and of the pooled
users who do not. A searcher who cannot match ``x`` for its interests is never read: 300
interestsOnly searchers with disjoint interests (a red-team run that saturated redis-server)
cost a search 30 commands and 0.1 ms of Redis time, as 10 do (the whole queue was read: 320
commands and 1.7 ms at 300; ``tests/redis/test_redis_search_cost.py``). What a step
costs grows with ``x``'s interests instead (at most ten): about three commands each, its
entries in the indexes and a range read (a searcher with ten interests searching again, ten
such queued: 67 commands, 0.17 ms; 48 and 0.13 ms when the whole queue was read, which at
50 queued was 88 and 0.43 ms against 66 and 0.18 ms).
A searcher turned away for another reason (another language, a block, a recent partner, a
shadow ban, its instance stalled) still costs a check of a few commands. So each of a step's
three walks (older searchers; newer ones sharing an interest; newer ones without) looks at
``SCAN_LIMIT`` (64) searchers at most: an internal bound, not a setting (64 searchers who
each blocked ``x``: 222 commands, however many more are queued). It is far above what an
ordinary queue puts before a match: the queue never holds a compatible pair, so the
searchers who may match ``x`` but do not are about one per language and interest, ``x``'s
blocks and recent partners, and a stalled instance's searchers. Past it the walk ends as if
nobody followed: ``x`` may pass over an older compatible searcher, or wait beside a
compatible one until one of them is looked at again (an interest wait's or a cooldown's end,
or its timeout); no rule is ever broken. Pooled users are read as before, with no such
bound: those sharing one of ``x``'s interests, and the pool in pooled order until the first
compatible one.
"""

from __future__ import annotations

from aleatoria.store.redis_scripts import (
    BLOCKS_PREFIX,
    DUE_KEY,
    LIVENESS_HELPERS,
    MATCH_COMMON_KEY,
    MATCH_HELPERS,
    MATCH_IDS_KEY,
    POOL_HELPERS,
    POOLED_KEY,
    PROFILE_HELPERS,
    PROFILES_KEY,
    QUEUE_KEY,
    RECENT_PREFIX,
    SEARCHER_INDEX_HELPERS,
    SHADOW_KEY,
    TAG_PREFIX,
)

# At most this many due searchers per tick (the rest wait for the next one).
TICK_BATCH = 200
# Each of a step's three walks over the queue's indexes looks at most at this many searchers
# (see "Cost" above), reading them this many at a time from each index.
SCAN_LIMIT = 64
SCAN_PAGE = 16

# The rules (``search.compatible``, ``search.on_change``, ``search.due``). Scripts set
# ``cfg`` (timeout, wait, cooldown in ms; now in ms) before calling them.
SEARCH_HELPERS = (
    """
local QUEUE, DUE, PROFILES, POOLED = 'QUEUE_KEY', 'DUE_KEY', 'PROFILES_KEY', 'POOLED_KEY'
local TAG, RECENT, MATCH_IDS = 'TAG_PREFIX', 'RECENT_PREFIX', 'MATCH_IDS_KEY'
local cfg = {timeout = 0, wait = 0, cooldown = 0, now = 0, token = '', made = 0}
local profiles = {}
local function profile(u)
  local p = profiles[u]
  if p == nil then
    local raw = redis.call('HGET', PROFILES, u)
    local ok, decoded = false, nil
    if raw then ok, decoded = pcall(cjson.decode, raw) end
    if ok and type(decoded) == 'table' then p = decoded else p = {} end
    if type(p.i) ~= 'table' then p.i = {} end
    p.set = {}
    for _, t in ipairs(p.i) do p.set[t] = true end
    if p.l == cjson.null then p.l = nil end
    profiles[u] = p
  end
  return p
end
local function common(a, b)
  local out = {}
  for _, t in ipairs(a.i) do if b.set[t] then out[#out + 1] = t end end
  return out
end
-- What one on_change learns of a user (in a live match, shadow-banned, online): nothing it
-- reads changes while it runs (only make_match, after it, changes the matches).
local facts = {}
local function known(kind, u, read)
  local key = kind .. u
  local value = facts[key]
  if value == nil then
    value = read(u)
    facts[key] = value
  end
  return value
end
local shadow_any = redis.call('ZCARD', SHADOW_KEY) > 0
local function read_shadowed(u)
  local until_s = redis.call('ZSCORE', SHADOW_KEY, u)
  return until_s ~= false and tonumber(until_s) * 1000 > cfg.now
end
local function shadowed(u)
  if not shadow_any then return false end
  return known('s|', u, read_shadowed)
end
local function barred(a, b)
  if redis.call('SISMEMBER', BLOCKS_PREFIX .. a, b) == 1 then return true end
  if redis.call('SISMEMBER', BLOCKS_PREFIX .. b, a) == 1 then return true end
  return shadowed(a) ~= shadowed(b)
end
local function read_in_match(u)
  return redis.call('HEXISTS', MATCHES, u) == 1
end
local function read_online(u)
  return online(KEYS[3], KEYS[4], u)
end
-- Whether ``ms`` have passed since ``since`` for certain. Both times are Redis's clock
-- truncated to the millisecond, so an equal difference may be up to 1 ms short: a wait, a
-- timeout or a cooldown must never end early (clients and tests time a wait from before
-- their request). No time at all (an interest wait of 0) has always passed.
local function passed(since, ms)
  return ms <= 0 or since + ms < cfg.now
end
-- The first millisecond at which ``passed(since, ms)`` holds: when to look again.
local function passes_at(since, ms)
  return since + ms + 1
end
local function recent(a, b)
  local t = redis.call('ZSCORE', RECENT .. a, b)
  return t ~= false and not passed(tonumber(t), cfg.cooldown)
end
local function interests_allow(c, shared)
  if not c.searcher or #profile(c.user).i == 0 or shared then return true end
  return profile(c.user).o ~= 1 and passed(c.since, cfg.wait)
end
-- c: {user, since (ms), searcher}. The checks of ``search.compatible``, the ones that turn
-- most candidates away at the least cost first (the answer is the same in any order).
local function compatible(a, b)
  if a.user == b.user then return false end
  local pa, pb = profile(a.user), profile(b.user)
  if pa.l and pb.l and pa.l ~= pb.l then return false end
  local shared = #common(pa, pb) > 0
  if not (interests_allow(a, shared) and interests_allow(b, shared)) then return false end
  if barred(a.user, b.user) then return false end
  if known('m|', a.user, read_in_match) or known('m|', b.user, read_in_match) then return false end
  if (a.searcher or b.searcher) and recent(a.user, b.user) then return false end
  return known('o|', a.user, read_online) and known('o|', b.user, read_online)
end
-- Names in the order Redis sorts equal scores and Python sorts strings: by bytes (Lua's own
-- ``<`` follows redis-server's collation locale).
local function bytes_less(a, b)
  if a == b then return false end
  for i = 1, math.min(#a, #b) do
    local ca, cb = string.byte(a, i), string.byte(b, i)
    if ca ~= cb then return ca < cb end
  end
  return #a < #b
end
-- Whether searcher a is before b in the queue: by since, then by name (as ZRANGE orders it).
local function ahead(a, b)
  if a.since ~= b.since then return a.since < b.since end
  return bytes_less(a.user, b.user)
end
local function better(x, c, best)
  if not best then return true end
  local nc, nb = #common(profile(x.user), profile(c.user)), #common(profile(x.user), profile(best.user))
  if nc ~= nb then return nc > nb end
  return ahead(c, best)
end
local function pooled(u)
  if redis.call('SISMEMBER', POOL, u) == 0 then return nil end
  -- A searcher is never a pooled candidate (its interestsOnly would not be weighed), even if
  -- a pool entry survived for it (e.g. a mirror resync after an outage).
  if redis.call('ZSCORE', QUEUE, u) then return nil end
  local since = redis.call('ZSCORE', POOLED, u)
  return {user = u, since = tonumber(since or 0), searcher = false}
end
-- Walks over some of the queue's indexes (sorted sets of searchers scored like the queue),
-- merged in queue order, each read SCAN_PAGE at a time. sets: {key, min, max} (scores). An
-- entry of a searcher no longer queued is dropped once the walk is over (not during it: the
-- pages are read by offset).
local function walk(sets)
  for _, set in ipairs(sets) do set.page, set.at, set.offset, set.done = {}, 1, 0, false end
  return {sets = sets, stale = {}}
end
local function step(w)
  local from, first = nil, nil
  for _, set in ipairs(w.sets) do
    if set.at > #set.page and not set.done then
      set.page = redis.call('ZRANGEBYSCORE', set.key, set.min, set.max, 'WITHSCORES',
        'LIMIT', set.offset, SCAN_PAGE)
      set.at, set.offset = 1, set.offset + SCAN_PAGE
      set.done = #set.page < 2 * SCAN_PAGE
    end
    if set.at <= #set.page then
      local c = {user = set.page[set.at], since = tonumber(set.page[set.at + 1]), searcher = true}
      if not first or ahead(c, first) then from, first = set, c end
    end
  end
  if not from then return nil end
  from.at = from.at + 2
  first.key = from.key
  return first
end
local function queued(w, c)
  local since = redis.call('ZSCORE', QUEUE, c.user)
  if since then return tonumber(since) == c.since end
  w.stale[#w.stale + 1] = c
  return false
end
local function finish(w)
  for _, c in ipairs(w.stale) do redis.call('ZREM', c.key, c.user) end
end
-- Visits walk w's searchers not seen yet, oldest first, at most SCAN_LIMIT of them, until
-- visit(s) returns true or stop(s) does (a searcher past the range); then ``finish``.
local function scan(w, seen, visit, stop)
  local left = SCAN_LIMIT
  while left > 0 do
    local s = step(w)
    if not s or (stop and stop(s)) then break end
    if not seen[s.user] then
      seen[s.user] = true
      left = left - 1
      if visit(s) then break end
    end
  end
  finish(w)
end
-- The indexes that hold every searcher who may be compatible with x, between scores min and
-- max: those sharing one of its interests (tags); when x may match without a common interest
-- (loose), those who may too: without interests (QUEUE_BARE, always) or with interests but
-- not interestsOnly once their interest wait has passed (QUEUE_OPEN, since + wait < now).
local function candidates(tags, loose, min, max)
  local sets = {}
  for _, t in ipairs(tags) do sets[#sets + 1] = {key = QUEUE_TAG .. t, min = min, max = max} end
  if loose then
    sets[#sets + 1] = {key = QUEUE_BARE, min = min, max = max}
    local waited = max
    if cfg.wait > 0 then
      waited = cfg.now - cfg.wait - 1
      if max ~= '+inf' and max < waited then waited = max end
    end
    sets[#sets + 1] = {key = QUEUE_OPEN, min = min, max = waited}
  end
  return sets
end
-- ``search.on_change``: the queue read through its indexes, so a step looks only at the
-- searchers who may be compatible with x, and at most SCAN_LIMIT of them per walk.
local function on_change(x)
  facts = {}
  local mine = profile(x.user)
  local loose = not x.searcher or #mine.i == 0 or (mine.o ~= 1 and passed(x.since, cfg.wait))
  local seen = {[x.user] = true}
  -- The oldest searcher older than x that is compatible with it gets x.
  local w = walk(candidates(mine.i, loose, '-inf', x.searcher and x.since or '+inf'))
  local found = nil
  scan(w, seen, function(s)
    if queued(w, s) and compatible(s, x) then found = s end
    return found ~= nil
  end, function(s) return x.searcher and not ahead(s, x) end)
  if found then return found, x end
  if not x.searcher then return nil end
  -- Else x takes the best compatible candidate (``better``): newer searchers sharing an
  -- interest ... (a new searcher is mostly the last in the queue: then there are none)
  local best = nil
  local newer = redis.call('ZRANGE', QUEUE, -1, -1)[1] ~= x.user
  if newer and #mine.i > 0 then
    w = walk(candidates(mine.i, false, x.since, '+inf'))
    scan(w, seen, function(s)
      if ahead(x, s) and queued(w, s) and better(x, s, best) and compatible(x, s) then best = s end
      return false
    end)
  end
  -- ... pooled users sharing an interest ...
  local pooled_seen = {}
  for _, tag in ipairs(mine.i) do
    for _, u in ipairs(redis.call('SMEMBERS', TAG .. tag)) do
      if not pooled_seen[u] then
        pooled_seen[u] = true
        local c = pooled(u)
        if not c or not profile(u).set[tag] then
          redis.call('SREM', TAG .. tag, u)
        elseif better(x, c, best) and compatible(x, c) then
          best = c
        end
      end
    end
  end
  -- ... and when x may take one without a common interest and nobody sharing one was found:
  -- the longest waiting newer searcher who may too, and the longest pooled user (the first
  -- compatible one of each: none of them shares an interest with x).
  if loose and not (best and #common(mine, profile(best.user)) > 0) then
    w = walk(candidates({}, newer, x.since, '+inf'))
    scan(w, seen, function(s)
      if not (ahead(x, s) and queued(w, s) and compatible(x, s)) then return false end
      if better(x, s, best) then best = s end
      return true
    end)
    local start, stale = 0, {}
    while true do
      local page = redis.call('ZRANGE', POOLED, start, start + 99, 'WITHSCORES')
      if #page == 0 then break end
      local found_pooled = false
      for i = 1, #page, 2 do
        local u = page[i]
        if redis.call('SISMEMBER', POOL, u) == 0 then
          stale[#stale + 1] = u
        elseif not pooled_seen[u] and not redis.call('ZSCORE', QUEUE, u) then
          local c = {user = u, since = tonumber(page[i + 1]), searcher = false}
          if compatible(x, c) then
            if better(x, c, best) then best = c end
            found_pooled = true
            break
          end
        end
      end
      if found_pooled then break end
      start = start + 100
    end
    for _, u in ipairs(stale) do redis.call('ZREM', POOLED, u) end
  end
  if best then return x, best end
  return nil
end
-- The indexes hold each searcher in exactly one of the three kinds: if their sizes do not add
-- up to the queue's (a queue written by an older version, or by hand), they are rebuilt from
-- it, O(searchers), once. (Stale tag entries are dropped when a walk meets them.)
local function check_index()
  local n = redis.call('ZCARD', QUEUE)
  local kinds = redis.call('ZCARD', QUEUE_BARE) + redis.call('ZCARD', QUEUE_OPEN)
    + redis.call('ZCARD', QUEUE_ONLY)
  if kinds == n then return end
  redis.call('DEL', QUEUE_BARE, QUEUE_OPEN, QUEUE_ONLY)
  local queue = redis.call('ZRANGE', QUEUE, 0, -1, 'WITHSCORES')
  for i = 1, #queue, 2 do index_searcher(queue[i], tonumber(queue[i + 1]), profile(queue[i])) end
end
-- When to look at u again: the first of its timeout, its interest wait and a cooldown to pass.
local function due(u, since)
  local when = passes_at(since, cfg.timeout)
  local p = profile(u)
  if #p.i > 0 and p.o ~= 1 and not passed(since, cfg.wait) then
    when = math.min(when, passes_at(since, cfg.wait))
  end
  if cfg.cooldown > 0 then
    local first = redis.call('ZRANGEBYSCORE', RECENT .. u, cfg.now - cfg.cooldown, '+inf',
      'WITHSCORES', 'LIMIT', 0, 1)
    if #first > 0 then
      local ends = passes_at(tonumber(first[2]), cfg.cooldown)
      if ends > cfg.now then when = math.min(when, ends) end
    end
  end
  return when
end
-- A searcher leaves the queue (its indexes and profile with it); nothing if u is not queued
-- (a pooled user's profile is ``unpool``'s).
local function dequeue(u)
  if redis.call('ZREM', QUEUE, u) == 1 then
    unindex_searcher(u, profile(u))
    redis.call('HDEL', PROFILES, u)
    profiles[u] = nil
  end
  redis.call('ZREM', DUE, u)
end
local function unpool(u)
  for _, tag in ipairs(profile(u).i) do redis.call('SREM', TAG .. tag, u) end
  pool_remove(u)
  redis.call('HDEL', PROFILES, u)
  profiles[u] = nil
end
local function remember(a, b)
  if cfg.cooldown <= 0 then return end
  for _, pair in ipairs({{a, b}, {b, a}}) do
    local key = RECENT .. pair[1]
    redis.call('ZADD', key, cfg.now, pair[2])
    redis.call('ZREMRANGEBYSCORE', key, '-inf', cfg.now - cfg.cooldown - 1)  -- passed for certain
    redis.call('PEXPIRE', key, math.ceil(cfg.cooldown) + 1)
  end
end
local function new_id()
  cfg.made = cfg.made + 1
  if cfg.made == 1 then return cfg.token end
  return cfg.token .. '-' .. cfg.made
end
-- Starts the match of served (impolite) and partner; its announcement.
local function make_match(served, partner)
  local shared = common(profile(served.user), profile(partner.user))
  local fallback, waited = {}, {}
  for _, c in ipairs({served, partner}) do
    if c.searcher then
      if #profile(c.user).i > 0 and #shared == 0 then fallback[#fallback + 1] = c.user end
      waited[#waited + 1] = tostring(cfg.now - c.since)
    end
  end
  for _, c in ipairs({served, partner}) do
    if c.searcher then dequeue(c.user) else unpool(c.user) end
  end
  local id = new_id()
  redis.call('HSET', MATCHES, served.user, partner.user .. '|impolite',
    partner.user, served.user .. '|polite')
  redis.call('HSET', MATCH_IDS, served.user, id, partner.user, id)
  if #shared > 0 then
    local encoded = cjson.encode(shared)
    redis.call('HSET', MATCH_COMMON_KEY, served.user, encoded, partner.user, encoded)
  end
  remember(served.user, partner.user)
  return {served.user, partner.user, id, shared, fallback, waited}
end
""".replace("QUEUE_KEY", QUEUE_KEY)
    .replace("DUE_KEY", DUE_KEY)
    .replace("PROFILES_KEY", PROFILES_KEY)
    .replace("POOLED_KEY", POOLED_KEY)
    .replace("TAG_PREFIX", TAG_PREFIX)
    .replace("RECENT_PREFIX", RECENT_PREFIX)
    .replace("MATCH_IDS_KEY", MATCH_IDS_KEY)
    .replace("MATCH_COMMON_KEY", repr(MATCH_COMMON_KEY))
    .replace("SHADOW_KEY", repr(SHADOW_KEY))
    .replace("BLOCKS_PREFIX", repr(BLOCKS_PREFIX))
    .replace("SCAN_LIMIT", str(SCAN_LIMIT))
    .replace("SCAN_PAGE", str(SCAN_PAGE))
)

_PRELUDE = MATCH_HELPERS + POOL_HELPERS + SEARCHER_INDEX_HELPERS + LIVENESS_HELPERS + SEARCH_HELPERS
_CONFIGURE = """
if redis.replicate_commands then redis.replicate_commands() end
cfg.timeout, cfg.wait, cfg.cooldown = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
cfg.token, cfg.now = ARGV[4], now_ms()
"""

# KEYS: pool, matches, presence, instances, this instance's users. ARGV: timeout, wait,
# cooldown (ms), id token, user, instance, profile JSON ('' for none). Returns {ended peer or
# '', match or {}} (match: impolite, polite, id, common, fallback, waited ms).
AVAILABLE = (
    _PRELUDE
    + _CONFIGURE
    + """
local user = ARGV[5]
local ended = end_match(user)
dequeue(user)  -- a searcher's place, indexes and profile
unpool(user)  -- a pooled user's place, tags and profile
if ARGV[7] ~= '' then
  redis.call('HSET', PROFILES, user, ARGV[7])
  for _, tag in ipairs(profile(user).i) do redis.call('SADD', TAG .. tag, user) end
end
pool_add(user, cfg.now)
if redis.call('HSETNX', KEYS[3], user, ARGV[6] .. '|') == 1 then
  redis.call('SADD', KEYS[5], user)
end
local made = {}
if redis.call('ZCARD', QUEUE) > 0 then
  check_index()
  local x = pooled(user)
  local served, partner = on_change(x)
  if served then made = make_match(served, partner) end
end
return {ended or '', made}
"""
)

# KEYS: pool, matches, presence, instances. ARGV: timeout, wait, cooldown (ms), id token,
# user, current peer ('' for none), profile JSON. Returns {'resend', peer, role, match id,
# common interests} or {'queued', ended or '', position, online, match or {}}.
SEARCH = (
    _PRELUDE
    + _CONFIGURE
    + """
local user, current = ARGV[5], ARGV[6]
local mine, role = partner(user)
local ended = ''
if mine then
  if mine ~= current then
    return {'resend', mine, role, redis.call('HGET', MATCH_IDS, user) or '', match_common(user)}
  end
  ended = end_match(user)
end
dequeue(user)
unpool(user)
redis.call('ZADD', QUEUE, cfg.now, user)
redis.call('HSET', PROFILES, user, ARGV[7])
index_searcher(user, cfg.now, profile(user))
redis.call('ZADD', DUE, due(user, cfg.now), user)
local position = redis.call('ZCOUNT', QUEUE, '-inf', cfg.now)
check_index()
local x = {user = user, since = cfg.now, searcher = true}
local made = {}
local served, partner_ = on_change(x)
if served then made = make_match(served, partner_) end
return {'queued', ended, position, redis.call('HLEN', KEYS[3]), made}
"""
)

# After an outage (``RedisStore.search_events``). KEYS: pool, matches (the pool's slot). ARGV:
# users an instance saw queued or pooled with a profile. Returns those Redis neither queues,
# pools nor matches: a Redis restarted empty (or the instance reaped) lost their search, and
# nobody would ever answer it.
LOST_SEARCHERS = """
local lost = {}
for _, user in ipairs(ARGV) do
  if not redis.call('ZSCORE', 'QUEUE_KEY', user) and redis.call('SISMEMBER', KEYS[1], user) == 0
    and redis.call('HEXISTS', KEYS[2], user) == 0 then
    lost[#lost + 1] = user
  end
end
return lost
""".replace("QUEUE_KEY", QUEUE_KEY)

# After an outage too. KEYS: pool. ARGV: user, profile JSON, ... (this instance's pooled users
# who gave a profile). Writes back the profile of each one still pooled without one (a Redis
# restarted empty: recovery pools them again, but knows no profiles). Returns how many.
RESTORE_PROFILES = """
local restored = 0
for i = 1, #ARGV, 2 do
  local user, raw = ARGV[i], ARGV[i + 1]
  if redis.call('SISMEMBER', KEYS[1], user) == 1
    and redis.call('HEXISTS', PROFILES_KEY, user) == 0 then
    redis.call('HSET', PROFILES_KEY, user, raw)
    local ok, p = pcall(cjson.decode, raw)
    if ok and type(p) == 'table' and type(p.i) == 'table' then
      for _, tag in ipairs(p.i) do redis.call('SADD', TAG_PREFIX .. tag, user) end
    end
    restored = restored + 1
  end
end
return restored
""".replace("PROFILES_KEY", repr(PROFILES_KEY)).replace("TAG_PREFIX", repr(TAG_PREFIX))

# KEYS: none needed but the pool's slot: pool. ARGV: user. Returns 1 if it was queued.
CANCEL = (
    PROFILE_HELPERS
    + SEARCHER_INDEX_HELPERS
    + """
local user = ARGV[1]
if redis.call('ZREM', 'QUEUE_KEY', user) == 0 then return 0 end
unindex_searcher(user, profile_of(user))
redis.call('ZREM', 'DUE_KEY', user)
redis.call('HDEL', 'PROFILES_KEY', user)
return 1
""".replace("QUEUE_KEY", QUEUE_KEY)
    .replace("DUE_KEY", DUE_KEY)
    .replace("PROFILES_KEY", PROFILES_KEY)
)

# A searcher whose instance is not alive is looked at again this often (ms) until its timeout.
OFFLINE_RECHECK_MS = 1000

# KEYS: pool, matches, presence, instances. ARGV: timeout, wait, cooldown (ms), id token,
# TICK_BATCH. Returns {timeouts, queue length, matches...}.
TICK = (
    _PRELUDE
    + _CONFIGURE
    + """
local due_now = redis.call('ZRANGEBYSCORE', DUE, '-inf', cfg.now, 'LIMIT', 0, tonumber(ARGV[5]))
local timeouts, made = {}, {}
if #due_now > 0 then
  check_index()
  local order = {}
  for _, u in ipairs(due_now) do
    local since = redis.call('ZSCORE', QUEUE, u)
    if since then
      order[#order + 1] = {user = u, since = tonumber(since), searcher = true}
    else
      redis.call('ZREM', DUE, u)
    end
  end
  table.sort(order, function(a, b)
    if a.since ~= b.since then return a.since < b.since end
    return a.user < b.user
  end)
  for _, x in ipairs(order) do
    if redis.call('ZSCORE', QUEUE, x.user) then
      if passed(x.since, cfg.timeout) then
        dequeue(x.user)
        timeouts[#timeouts + 1] = x.user
      elseif not online(KEYS[3], KEYS[4], x.user) then
        -- Its instance missed heartbeats: dead, or only stalled (it re-registers and its
        -- users are online again). It keeps its place, unmatchable meanwhile, and is looked
        -- at again each second until its timeout answers it (to its instance, if alive).
        local again = math.min(passes_at(x.since, cfg.timeout), cfg.now + OFFLINE_RECHECK_MS)
        redis.call('ZADD', DUE, again, x.user)
      else
        redis.call('ZADD', DUE, due(x.user, x.since), x.user)
        local served, partner_ = on_change(x)
        if served then made[#made + 1] = make_match(served, partner_) end
      end
    end
  end
end
return {timeouts, redis.call('ZCARD', QUEUE), unpack(made)}
""".replace("OFFLINE_RECHECK_MS", str(OFFLINE_RECHECK_MS))
)
