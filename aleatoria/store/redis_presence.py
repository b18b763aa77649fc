"""Presence in Redis (PROTOCOL.md section 9): who is online on which instance, instance
heartbeats, the reaping of dead instances, and routing a frame to a user's instance.

How this works.
- Every instance has a random id and heartbeats: ``heartbeat`` puts ``now + ttl`` (Redis'
  clock, milliseconds) as its score in the sorted set of instances. An instance whose score
  is in the past is dead. All liveness decisions use Redis' own ``TIME``, so the instances'
  clocks never matter.
- ``presence`` maps each connected user to ``"instance|connection"``; each instance also
  keeps the set of users it registered, so reaping it costs its own users, not a scan.
- ``connect`` registers a connection and returns what the user had elsewhere (previous
  instance and connection, pool place, live match) so the new instance can take it over;
  ``disconnect`` removes the user's presence, pool place (with its pooled profile:
  ``LEAVE_POOL``) and match only if the closing connection is still the registered one (a
  user who moved on keeps its state).
- ``reap`` (run by every instance every heartbeat, atomic, so only one cleaner wins per
  dead instance) removes dead instances and, for each of their users still registered
  there, the presence, the pool place and the live match; it returns the ended matches so
  the caller can tell the surviving peers.
- An instance is alive while its heartbeat has not expired and its channel has a subscriber:
  a killed process drops its Redis connections at once, so its users are offline for
  matchmaking and routing immediately, and reaped within ``presence_ttl`` +
  ``heartbeat_interval``.
- ``route`` looks a user up and publishes a frame on its instance's channel if that
  instance is alive; it returns how many subscribers got it (0: the user is offline).

Every key and channel here carries the pool's hash tag ``{available:webrtc}``, so these
scripts and the matchmaking scripts touch one Redis Cluster slot, and ``route`` may
SPUBLISH to an instance channel from a script on a cluster.
"""

from __future__ import annotations

from aleatoria.store.redis_scripts import (
    INSTANCE_CHANNEL_PREFIX,
    LIVENESS_HELPERS,
    MATCH_HELPERS,
    POOL_HELPERS,
    PROFILE_HELPERS,
    QUEUE_KEY,
)

TAG = "{available:webrtc}"
INSTANCES_KEY = f"aleatoria:instances:{TAG}"
PRESENCE_KEY = f"aleatoria:presence:{TAG}"
INSTANCE_USERS_PREFIX = f"aleatoria:instance-users:{TAG}:"


def instance_users_key(instance: str) -> str:
    return INSTANCE_USERS_PREFIX + instance


def instance_channel(instance: str) -> str:
    return INSTANCE_CHANNEL_PREFIX + instance


# A user gone (disconnect, or reaped with its dead instance) leaves the pool as a match takes a
# pooled user out of it (``REQUEST_PEER``): the pool, its index, the pooled users by time, the
# profile and the interests' tag sets. A queued searcher's profile is its queue place's (the
# queue's indexes are unindexed with it), left to ``CANCEL`` (the disconnecting instance's) or
# to the tick's timeout (a searcher of a stalled instance keeps its place while reaped:
# PROTOCOL.md section 16).
LEAVE_POOL = (
    POOL_HELPERS
    + PROFILE_HELPERS
    + """
local function leave_pool(user)
  if not redis.call('ZSCORE', QUEUE_KEY, user) then forget_profile(user) end
  pool_remove(user)
end
""".replace("QUEUE_KEY", repr(QUEUE_KEY))
)


# KEYS: instances, presence. ARGV: instance, ttl (ms), then users. Returns {state, then what
# presence says of each user (nil = absent)}; state is 'ok' (was alive), 'lapsed' (expired but
# still listed: nobody reaped it) or 'gone' (not listed: first beat, Redis emptied, or reaped).
# The presence read is in the same atomic step as the beat: a reap between the two would make
# this instance's own users look replaced (their presence removed) while it still counts
# itself alive, and it would close them instead of re-registering them.
HEARTBEAT = (
    LIVENESS_HELPERS
    + """
local now = now_ms()
local previous = redis.call('ZSCORE', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
local state = 'ok'
if not previous then state = 'gone' elseif tonumber(previous) <= now then state = 'lapsed' end
local out = {state}
for first = 3, #ARGV, 1000 do
  local values = redis.call('HMGET', KEYS[2], unpack(ARGV, first, math.min(first + 999, #ARGV)))
  for _, value in ipairs(values) do out[#out + 1] = value end
end
return out
"""
)

# KEYS: pool, matches, presence, this instance's users, bans, blocked-by:<user>.
# ARGV: user, instance, connection, instance-users prefix.
# Returns {previous instance, previous connection, in pool (0/1), peer, role, queued (0/1),
# the user's ban JSON, the users who block it}; '' = none. Pool place, match and search queue
# place are reported only when the previous registration was on another instance (the caller
# takes them over: a queued searcher's place is left by this instance when it disconnects);
# the previous instance forgets the user. Ban and blocks are read in the same step: a ban or block stored
# after the handshake's read (``ADMIT``) whose kick or notice went where presence named the
# user before this registration would otherwise never reach this connection (PROTOCOL.md
# section 13).
CONNECT = (
    MATCH_HELPERS
    + LIVENESS_HELPERS
    + """
local PRESENCE, MINE = KEYS[3], KEYS[4]
local user, inst, conn, prefix = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local ban = redis.call('HGET', KEYS[5], user) or ''
local blockers = redis.call('SMEMBERS', KEYS[6])
local previous = redis.call('HGET', PRESENCE, user)
redis.call('HSET', PRESENCE, user, inst .. '|' .. conn)
redis.call('SADD', MINE, user)
if not previous then return {'', '', 0, '', '', 0, ban, blockers} end
local pinst, pconn = split(previous)
if pinst == inst then return {pinst, pconn, 0, '', '', 0, ban, blockers} end
redis.call('SREM', prefix .. pinst, user)
local peer, role = partner(user)
local queued = 0
if redis.call('ZSCORE', QUEUE_KEY, user) then queued = 1 end
return {pinst, pconn, redis.call('SISMEMBER', POOL, user), peer or '', role or '', queued, ban, blockers}
""".replace("QUEUE_KEY", repr(QUEUE_KEY))
)

# KEYS: pool, matches, presence, this instance's users. ARGV: user, instance, connection
# ('' = whichever connection this instance registered). Returns {owned (0/1), ended peer or ''}.
# Not owned (the user is registered by another instance or connection now): nothing changes
# but this instance's own bookkeeping.
DISCONNECT = (
    MATCH_HELPERS
    + LEAVE_POOL
    + LIVENESS_HELPERS
    + """
local PRESENCE, MINE = KEYS[3], KEYS[4]
local user, inst, conn = ARGV[1], ARGV[2], ARGV[3]
local value = redis.call('HGET', PRESENCE, user)
if value then
  local pinst, pconn = split(value)
  if pinst ~= inst then
    redis.call('SREM', MINE, user)
    return {0, ''}
  end
  if conn ~= '' and pconn ~= conn then return {0, ''} end
  redis.call('HDEL', PRESENCE, user)
end
redis.call('SREM', MINE, user)
leave_pool(user)
return {1, end_match(user) or ''}
"""
)

# KEYS: pool, matches, instances, presence. ARGV: this instance, instance-users prefix, at most
# how many dead instances to reap. Returns {dead instances, users removed, ended pairs as a
# flat list leaver1, peer1, leaver2, peer2, ...}.
REAP = (
    MATCH_HELPERS
    + LEAVE_POOL
    + LIVENESS_HELPERS
    + """
local INSTANCES, PRESENCE = KEYS[3], KEYS[4]
local me, prefix = ARGV[1], ARGV[2]
local dead = redis.call('ZRANGEBYSCORE', INSTANCES, '-inf', now_ms(), 'LIMIT', 0, tonumber(ARGV[3]))
local reaped, gone, ended = {}, {}, {}
for _, d in ipairs(dead) do
  if d ~= me then
    redis.call('ZREM', INSTANCES, d)
    local key = prefix .. d
    for _, user in ipairs(redis.call('SMEMBERS', key)) do
      local value = redis.call('HGET', PRESENCE, user)
      if value and split(value) == d then
        redis.call('HDEL', PRESENCE, user)
        leave_pool(user)
        local peer = end_match(user)
        gone[#gone + 1] = user
        if peer then
          ended[#ended + 1] = user
          ended[#ended + 1] = peer
        end
      end
    end
    redis.call('DEL', key)
    reaped[#reaped + 1] = d
  end
end
return {reaped, gone, ended}
"""
)

# KEYS: presence, instances, matches. ARGV: user, message, instance channel prefix, publish
# command (PUBLISH, or SPUBLISH on a cluster), sender ('' = any). Returns the number of
# subscribers that got it: -1 when the user is offline (no presence: its session is over);
# 0 when its instance's heartbeat expired, nobody listens on its channel, or -- with a
# sender -- the user is in a live match with someone else (call signaling is not hijacked:
# PROTOCOL.md section 16). PUBLISH's own count
# stands in for the liveness check's subscriber test: this script runs for every frame
# routed to another instance, so it is kept short.
ROUTE = """
local value = redis.call('HGET', KEYS[1], ARGV[1])
if not value then return -1 end
if ARGV[5] ~= '' then
  local match = redis.call('HGET', KEYS[3], ARGV[1])
  if match then
    local bar = string.find(match, '|', 1, true)
    if (bar and string.sub(match, 1, bar - 1) or match) ~= ARGV[5] then return 0 end
  end
end
local sep = string.find(value, '|', 1, true)
local inst = sep and string.sub(value, 1, sep - 1) or value
local score = redis.call('ZSCORE', KEYS[2], inst)
if not score then return 0 end
local t = redis.call('TIME')
if tonumber(score) <= tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) then return 0 end
return redis.call(ARGV[4], ARGV[3] .. inst, ARGV[2])
"""
