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

Cost: ``on_change`` reads the queue (O(searchers)) and, for a searcher, the pooled users
sharing one of its interests and the pooled users in pooled order until the first
compatible one. Every step costs a few Redis commands per candidate looked at.
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
    PROFILES_KEY,
    QUEUE_KEY,
    RECENT_PREFIX,
    SHADOW_KEY,
    TAG_PREFIX,
)

# At most this many due searchers per tick (the rest wait for the next one).
TICK_BATCH = 200

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
local shadow_any = redis.call('ZCARD', SHADOW_KEY) > 0
local function shadowed(u)
  if not shadow_any then return false end
  local until_s = redis.call('ZSCORE', SHADOW_KEY, u)
  return until_s ~= false and tonumber(until_s) * 1000 > cfg.now
end
local function barred(a, b)
  if redis.call('SISMEMBER', BLOCKS_PREFIX .. a, b) == 1 then return true end
  if redis.call('SISMEMBER', BLOCKS_PREFIX .. b, a) == 1 then return true end
  return shadowed(a) ~= shadowed(b)
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
-- c: {user, since (ms), searcher}
local function compatible(a, b)
  if a.user == b.user then return false end
  local pa, pb = profile(a.user), profile(b.user)
  if pa.l and pb.l and pa.l ~= pb.l then return false end
  local shared = #common(pa, pb) > 0
  if not (interests_allow(a, shared) and interests_allow(b, shared)) then return false end
  if redis.call('HEXISTS', MATCHES, a.user) == 1 or redis.call('HEXISTS', MATCHES, b.user) == 1 then
    return false
  end
  if barred(a.user, b.user) then return false end
  if (a.searcher or b.searcher) and recent(a.user, b.user) then return false end
  return online(KEYS[3], KEYS[4], a.user) and online(KEYS[3], KEYS[4], b.user)
end
local function better(x, c, best)
  if not best then return true end
  local nc, nb = #common(profile(x.user), profile(c.user)), #common(profile(x.user), profile(best.user))
  if nc ~= nb then return nc > nb end
  if c.since ~= best.since then return c.since < best.since end
  return c.user < best.user
end
local function pooled(u)
  if redis.call('SISMEMBER', POOL, u) == 0 then return nil end
  -- A searcher is never a pooled candidate (its interestsOnly would not be weighed), even if
  -- a pool entry survived for it (e.g. a mirror resync after an outage).
  if redis.call('ZSCORE', QUEUE, u) then return nil end
  local since = redis.call('ZSCORE', POOLED, u)
  return {user = u, since = tonumber(since or 0), searcher = false}
end
local function on_change(x)
  local queue = redis.call('ZRANGE', QUEUE, 0, -1, 'WITHSCORES')
  local newer, older = {}, true
  for i = 1, #queue, 2 do
    local s = {user = queue[i], since = tonumber(queue[i + 1]), searcher = true}
    if s.user == x.user then
      older = false
    elseif older then
      if compatible(s, x) then return s, x end
    elseif x.searcher then
      newer[#newer + 1] = s
    end
  end
  if not x.searcher then return nil end
  local best = nil
  for _, s in ipairs(newer) do
    if better(x, s, best) and compatible(x, s) then best = s end
  end
  -- Pooled users sharing an interest.
  local seen = {}
  local mine = profile(x.user)
  for _, tag in ipairs(mine.i) do
    for _, u in ipairs(redis.call('SMEMBERS', TAG .. tag)) do
      if not seen[u] then
        seen[u] = true
        local c = pooled(u)
        if not c or not profile(u).set[tag] then
          redis.call('SREM', TAG .. tag, u)
        elseif better(x, c, best) and compatible(x, c) then
          best = c
        end
      end
    end
  end
  -- Anyone: the longest pooled compatible user (when x may take one without a common
  -- interest, and nobody sharing one was found).
  local any = #mine.i == 0 or (mine.o ~= 1 and passed(x.since, cfg.wait))
  if any and not (best and #common(mine, profile(best.user)) > 0) then
    local start, stale = 0, {}
    while true do
      local page = redis.call('ZRANGE', POOLED, start, start + 99, 'WITHSCORES')
      if #page == 0 then break end
      local found = false
      for i = 1, #page, 2 do
        local u = page[i]
        if redis.call('SISMEMBER', POOL, u) == 0 then
          stale[#stale + 1] = u
        elseif not seen[u] and not redis.call('ZSCORE', QUEUE, u) then
          local c = {user = u, since = tonumber(page[i + 1]), searcher = false}
          if compatible(x, c) then
            if better(x, c, best) then best = c end
            found = true
            break
          end
        end
      end
      if found then break end
      start = start + 100
    end
    for _, u in ipairs(stale) do redis.call('ZREM', POOLED, u) end
  end
  if best then return x, best end
  return nil
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
local function dequeue(u)
  redis.call('ZREM', QUEUE, u)
  redis.call('ZREM', DUE, u)
  redis.call('HDEL', PROFILES, u)
  profiles[u] = nil
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
)

_PRELUDE = MATCH_HELPERS + POOL_HELPERS + LIVENESS_HELPERS + SEARCH_HELPERS
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
unpool(user)  -- and its profile: of a searcher's dequeue, the queue's two entries are left
redis.call('ZREM', QUEUE, user)
redis.call('ZREM', DUE, user)
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
unpool(user)
dequeue(user)
redis.call('ZADD', QUEUE, cfg.now, user)
redis.call('HSET', PROFILES, user, ARGV[7])
redis.call('ZADD', DUE, due(user, cfg.now), user)
local position = redis.call('ZCOUNT', QUEUE, '-inf', cfg.now)
local x = {user = user, since = cfg.now, searcher = true}
local made = {}
local served, partner_ = on_change(x)
if served then made = make_match(served, partner_) end
return {'queued', ended, position, redis.call('HLEN', KEYS[3]), made}
"""
)

# KEYS: none needed but the pool's slot: pool. ARGV: user. Returns 1 if it was queued.
CANCEL = (
    """
local user = ARGV[1]
if redis.call('ZREM', 'QUEUE_KEY', user) == 0 then return 0 end
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
