"""A bare trio matchmaker and call-signal relay: this machine's floor for the ``match`` scenario.

What random matching costs a server at the sockets, and nothing more. One task per
connection, as Aleatoria has; a text frame's kind is told by its first bytes, as the
reference generator writes them:
- ``user_available_webrtc`` pools the user (ending its match, if any);
- ``request_random_peer`` answers with the user's current ``assign_role`` again when it is in
  a match (PROTOCOL.md section 4), else picks a pooled user uniformly at random, takes both
  out of the pool and sends each its ``assign_role``, or ``no_peer_available``;
- an offer, answer, candidate or hangup goes to its ``toUser`` with ``fromUser`` spliced in;
  a hangup ends the match.
No JSON parse, no checks, no ids, no store, no rate limits, no errors. So its match latency
under ``loadgen match`` is what a server on this core reaches when it does only this:
Aleatoria's latency against it is what Aleatoria's own work costs.

With ``--redis-url`` the pool and the matches are in Redis, as PROTOCOL.md requires for
more than one instance, and the store is reached as the brief fixes: redis-py's sync client
on worker threads (``trio.to_thread.run_sync``). What any such server must do, and what
Aleatoria does to do it cheaply, is done here too: one script per store step (pool, request,
or both, and hangup), the calls of one scheduler pass sent together in one request on one
worker thread (Aleatoria's ``redis_batch``), a ``user_available_webrtc`` held until the
user's next frame and joined to a request that follows it (Aleatoria holds it only to the
end of the read; this floor, for the generator's pattern only, longer). Relays go to local
users only (one instance).

    taskset -c 0 python scripts/match_floor.py --port 8097 & SP=$!
    taskset -c 1 loadgen match --users 200 --duration 8s --url ws://127.0.0.1:8097 --server-pid $SP

or as a ``--server`` of ``compare.py`` beside ``aleatoria serve``.
"""

from __future__ import annotations

import argparse
import os
import random
import socket
from collections.abc import Awaitable
from functools import partial
from typing import Any

import attrs
import redis
import trio
from dm_floor import handshake, read_text  # beside this
from handshake_floor import run_until_interrupted

from aleatoria.frames import text_frame
from aleatoria.store.redis_request import Request

_AVAILABLE = b'{"type":"user_available_webrtc"'
_REQUEST = b'{"type":"request_random_peer"'
_HANGUP = b'{"type":"hangup"'
_TO_USER = b'"toUser":"'
_NO_PEER = (
    b'{"type":"no_peer_available","fromUser":"system","toUser":"%s","payload":'
    b'{"message":"No peer available at the moment. Please try again later."}}'
)
_ASSIGN = b'{"type":"assign_role","fromUser":"system","toUser":"%s","payload":{"role":"%s","peerId":"%s"}}'


@attrs.define
class Matcher:
    """Who is online, who is pooled and who is in a match with whom."""

    sockets: dict[bytes, socket.socket] = attrs.Factory(dict)
    # The pool as a list (a uniform pick is one index) and each user's place in it.
    pool: list[bytes] = attrs.Factory(list)
    place: dict[bytes, int] = attrs.Factory(dict)
    # Each matched user's peer, and the assign_role frame it was sent (re-sent on a crossed request).
    matches: dict[bytes, tuple[bytes, bytes]] = attrs.Factory(dict)

    def on_text(self, user: bytes, payload: bytes) -> None:
        if payload.startswith(_AVAILABLE):
            self._end(user)
            self._pool(user)
        elif payload.startswith(_REQUEST):
            self._request(user)
        else:
            self._relay(user, payload)

    async def leave(self, user: bytes) -> None:
        self._unpool(user)
        self._end(user)
        del self.sockets[user]

    def _request(self, user: bytes) -> None:
        sock = self.sockets[user]
        match = self.matches.get(user)
        if match is not None:
            sock.send(match[1])
            return
        pooled = self._unpool(user)  # a pooled requester leaves the pool when matched
        if not self.pool:
            if pooled:
                self._pool(user)
            sock.send(text_frame(_NO_PEER % user))
            return
        peer = self.pool[random.randrange(len(self.pool))]
        self._unpool(peer)
        mine = text_frame(_ASSIGN % (user, b"impolite", peer))
        theirs = text_frame(_ASSIGN % (peer, b"polite", user))
        self.matches[user] = (peer, mine)
        self.matches[peer] = (user, theirs)
        sock.send(mine)
        self.sockets[peer].send(theirs)

    def _relay(self, user: bytes, payload: bytes) -> None:
        to = _relay(self.sockets, user, payload)
        if payload.startswith(_HANGUP) and to is not None and self.matches.get(user, (None,))[0] == to:
            del self.matches[user], self.matches[to]

    def _end(self, user: bytes) -> None:
        match = self.matches.pop(user, None)
        if match is not None:
            del self.matches[match[0]]

    def _pool(self, user: bytes) -> None:
        if user not in self.place:
            self.place[user] = len(self.pool)
            self.pool.append(user)

    def _unpool(self, user: bytes) -> bool:
        at = self.place.pop(user, None)
        if at is None:
            return False
        last = self.pool.pop()
        if last != user:
            self.pool[at] = last
            self.place[last] = at
        return True


# KEYS: the pool (a set), the matches (a hash: user -> "i" or "p", then the peer).
# ARGV: the user; what to do: "pool", "request", or "both" (pool, then request).
_STEP = """
local user, step = ARGV[1], ARGV[2]
local current = redis.call('HGET', KEYS[2], user)
if step ~= 'request' then
  if current then
    redis.call('HDEL', KEYS[2], user, string.sub(current, 2))
    current = false
  end
  redis.call('SADD', KEYS[1], user)
  if step == 'pool' then return false end
end
if current then return current end
local pooled = redis.call('SREM', KEYS[1], user)
local peer = redis.call('SRANDMEMBER', KEYS[1])
if not peer then
  if pooled == 1 then redis.call('SADD', KEYS[1], user) end
  return false
end
redis.call('SREM', KEYS[1], peer)
redis.call('HSET', KEYS[2], user, 'i' .. peer, peer, 'p' .. user)
return 'i' .. peer
"""
# ARGV: the user, the peer it hangs up on (or "" to leave: out of the pool and any match).
_END = """
local user, peer = ARGV[1], ARGV[2]
local current = redis.call('HGET', KEYS[2], user)
if peer == '' then
  redis.call('SREM', KEYS[1], user)
  if current then peer = string.sub(current, 2) end
end
if current and string.sub(current, 2) == peer then redis.call('HDEL', KEYS[2], user, peer) end
return false
"""


@attrs.define
class _Batch:
    request: Request = attrs.Factory(Request)
    size: int = 0
    replies: list[Any] = attrs.Factory(list)
    done: trio.Event = attrs.Factory(trio.Event)


@attrs.define
class _Store:
    """Script calls of one scheduler pass, sent as one request from one worker thread."""

    client: redis.Redis
    keys: tuple[bytes, bytes]
    step: str  # the scripts' SHA1s
    end: str
    _open: _Batch | None = None

    async def call(self, sha: str, *args: bytes) -> Any:
        batch = self._open
        if batch is None:
            batch = self._open = _Batch()
            index = self._add(batch, sha, args)
            await trio.lowlevel.cancel_shielded_checkpoint()  # the pass's other calls join
            self._open = None
            with trio.CancelScope(shield=True):
                batch.replies = await trio.to_thread.run_sync(
                    partial(batch.request.send, raise_on_error=False), self.client
                )
            batch.done.set()
        else:
            index = self._add(batch, sha, args)
            await batch.done.wait()
        reply = batch.replies[index]
        if isinstance(reply, Exception):
            raise reply
        return reply

    def _add(self, batch: _Batch, sha: str, args: tuple[bytes, ...]) -> int:
        batch.request.command(b"EVALSHA", sha, 2, *self.keys, *args)
        batch.size += 1
        return batch.size - 1


@attrs.define
class RedisMatcher:
    """The same behaviour with the pool and the matches in Redis."""

    store: _Store
    sockets: dict[bytes, socket.socket] = attrs.Factory(dict)
    held: set[bytes] = attrs.Factory(set)

    def on_text(self, user: bytes, payload: bytes) -> Awaitable[None] | None:
        if payload.startswith(_AVAILABLE):
            self.held.add(user)
            return None
        if payload.startswith(_REQUEST):
            step = b"both" if user in self.held else b"request"
            self.held.discard(user)
            return self._request(user, step)
        if user in self.held:
            self.held.discard(user)
            return self._pool_then(user, payload)
        return self._signal(user, payload)

    async def leave(self, user: bytes) -> None:
        del self.sockets[user]
        self.held.discard(user)
        with trio.CancelScope(shield=True):
            await self.store.call(self.store.end, user, b"")

    async def _request(self, user: bytes, step: bytes) -> None:
        reply = await self.store.call(self.store.step, user, step)
        sock = self.sockets[user]
        if reply is None:
            sock.send(text_frame(_NO_PEER % user))
            return
        role, peer = (b"impolite" if reply[:1] == b"i" else b"polite"), reply[1:]
        sock.send(text_frame(_ASSIGN % (user, role, peer)))
        if role == b"impolite" and (theirs := self.sockets.get(peer)) is not None:
            theirs.send(text_frame(_ASSIGN % (peer, b"polite", user)))

    async def _pool_then(self, user: bytes, payload: bytes) -> None:
        await self.store.call(self.store.step, user, b"pool")
        if (pending := self._signal(user, payload)) is not None:
            await pending

    def _signal(self, user: bytes, payload: bytes) -> Awaitable[None] | None:
        to = _relay(self.sockets, user, payload)
        if to is not None and payload.startswith(_HANGUP):
            return self.store.call(self.store.end, user, to)
        return None


def _relay(sockets: dict[bytes, socket.socket], user: bytes, payload: bytes) -> bytes | None:
    """Send a signal on to its ``toUser`` (if here) with ``fromUser`` spliced in; its ``toUser``."""
    at = payload.find(_TO_USER)
    if at < 0:
        return None
    at += len(_TO_USER)
    to = payload[at : payload.index(b'"', at)]
    peer = sockets.get(to)
    if peer is not None:
        peer.send(text_frame(b'{"fromUser":"' + user + b'",' + payload[1:]))
    return to


def _redis_matcher(url: str) -> RedisMatcher:
    client = redis.Redis.from_url(url)
    prefix = f"match_floor:{os.getpid()}:".encode()  # each run its own pool
    store = _Store(
        client, (prefix + b"pool", prefix + b"matches"), client.script_load(_STEP), client.script_load(_END)
    )
    return RedisMatcher(store)


async def _connection(sock: socket.socket, matcher: Matcher | RedisMatcher) -> None:
    with sock:
        user = await handshake(sock)
        if user is None or user in matcher.sockets:
            return
        matcher.sockets[user] = sock
        try:
            await read_text(sock, partial(matcher.on_text, user))
        finally:
            await matcher.leave(user)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--port", type=int, default=8097, help="0: any free port (printed)")
    parser.add_argument("--redis-url", help="keep the pool and the matches in this Redis")
    args = parser.parse_args()
    if not 0 <= args.port <= 65535:
        parser.error("--port must be 0..65535")
    try:
        matcher = Matcher() if args.redis_url is None else _redis_matcher(args.redis_url)
    except (redis.RedisError, OSError) as exc:
        parser.error(f"--redis-url: no redis-server at {args.redis_url} ({exc})")
    run_until_interrupted("match_floor", args.port, partial(_connection, matcher=matcher))


if __name__ == "__main__":
    main()
