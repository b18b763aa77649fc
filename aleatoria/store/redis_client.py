"""The one place that talks to redis-py: a sync client whose calls run on worker threads.

Every call goes through ``RedisClient.call``: the blocking function runs in a trio worker
thread under our own ``CapacityLimiter`` (so Redis can never take more than ``threads``
threads, and the trio loop never blocks), on a client whose sockets have connect and read
timeouts. redis-py's own retries are off: the store's supervisor decides when to try again.
Every redis-py and socket error becomes ``StoreUnavailable`` here and nowhere else.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar
from urllib.parse import urlsplit

import redis
import trio
from redis.backoff import NoBackoff
from redis.commands.core import Script
from redis.retry import Retry

from aleatoria.errors import StoreUnavailable
from aleatoria.store import redis_scripts as lua

T = TypeVar("T")

_HEALTH_CHECK_SECONDS = 30


class Scripts:
    """The store's Lua scripts, registered on one client. Called as ``Script`` objects,
    redis-py reloads them on NOSCRIPT; the writer sends ``room_append`` and ``dm_append``
    as raw EVALSHA in its pipelines (no SCRIPT EXISTS round trip per batch), so ``load``
    must have run on the current Redis (the store does it on every (re)connection, and a
    NOSCRIPT there means Redis restarted: the store resyncs)."""

    def __init__(self, client: redis.Redis) -> None:
        self.set_available: Script = client.register_script(lua.SET_AVAILABLE)
        self.user_gone: Script = client.register_script(lua.USER_GONE)
        self.hangup: Script = client.register_script(lua.HANGUP)
        self.request_peer: Script = client.register_script(lua.REQUEST_PEER)
        self.sync_user: Script = client.register_script(lua.SYNC_USER)
        self.join_room: Script = client.register_script(lua.JOIN_ROOM)
        self.leave_room: Script = client.register_script(lua.LEAVE_ROOM)
        self.rooms: Script = client.register_script(lua.ROOMS)
        self.dm_append: Script = client.register_script(lua.DM_APPEND)
        self.room_append: Script = client.register_script(lua.ROOM_APPEND)
        self._all = list(vars(self).values())

    def load(self, client: redis.Redis) -> None:
        """SCRIPT LOAD every script (idempotent; one pipeline)."""
        pipe = client.pipeline(transaction=False)
        for script in self._all:
            pipe.script_load(script.script)
        pipe.execute()


def describe_url(url: str) -> str:
    """``url`` without its credentials, for logs."""
    parts = urlsplit(url)
    host = parts.hostname or "?"
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


class RedisClient:
    """A redis-py client used only from worker threads, through ``call``."""

    def __init__(self, url: str, *, connect_timeout: float, call_timeout: float, threads: int = 8) -> None:
        self.url = describe_url(url)
        self.redis = redis.Redis.from_url(
            url,
            socket_connect_timeout=connect_timeout,
            socket_timeout=call_timeout,
            retry=Retry(NoBackoff(), 0),
            health_check_interval=_HEALTH_CHECK_SECONDS,
            protocol=2,
            client_name="aleatoria",
        )
        self.scripts = Scripts(self.redis)
        self._limiter = trio.CapacityLimiter(threads)
        # Figures for /metrics and the logs.
        self.calls = 0
        self.failures = 0
        self.call_seconds = 0.0

    async def call(
        self,
        fn: Callable[[redis.Redis], T],
        *,
        gate: Callable[[], bool] | None = None,
        abandon_on_cancel: bool = False,
    ) -> T:
        """Run ``fn(client)`` on a worker thread. Raises StoreUnavailable for any Redis or
        socket error, and without calling ``fn`` when ``gate()`` is false once a thread is
        free (calls queued behind a hung Redis then fail at once instead of each waiting
        for its own timeout). Cancellation: with ``abandon_on_cancel`` (only for reads,
        whose result may be dropped) the thread is left to finish alone; otherwise
        cancellation waits for the call, which the socket timeouts bound."""
        client = self.redis

        def run() -> tuple[T, float]:
            if gate is not None and not gate():
                raise _Skipped("skipped: the store is degraded")
            started = time.perf_counter()
            try:
                return fn(client), time.perf_counter() - started
            except (redis.RedisError, OSError) as exc:
                raise StoreUnavailable(_describe(exc)) from exc

        self.calls += 1
        try:
            result, seconds = await trio.to_thread.run_sync(
                run, limiter=self._limiter, abandon_on_cancel=abandon_on_cancel
            )
        except _Skipped:
            raise
        except StoreUnavailable:
            self.failures += 1
            raise
        self.call_seconds += seconds
        return result

    def close(self) -> None:
        """Close every pooled connection (sync and quick: sockets are just closed)."""
        self.redis.close()
        self.redis.connection_pool.disconnect()


class _Skipped(StoreUnavailable):
    """The call was not made: the store went degraded while it waited for a thread."""


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().replace("\n", " ")[:200]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
