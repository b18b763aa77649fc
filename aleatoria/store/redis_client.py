"""The one place that creates redis-py clients: a sync client whose calls run on worker threads.

Every call goes through ``RedisClient.call``: the blocking function runs in a trio worker
thread under our own ``CapacityLimiter`` (so Redis can never take more than ``threads``
threads, and the trio loop never blocks), on a client whose sockets have connect and read
timeouts. redis-py's own retries are off: the store's supervisor decides when to try again.
Every redis-py and socket error becomes ``StoreUnavailable`` here and nowhere else (the bus's
subscriber thread, ``redis_bus``, catches its own).

Redis Cluster (``redis+cluster://`` or ``--redis-cluster``): the client is a
``redis.cluster.RedisCluster``, created on first use on a worker thread (it asks the
cluster for its slots when created, so it cannot be built while the cluster is down).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit

import redis
import redis.cluster
import trio
from prometheus_client import Histogram
from redis._parsers.encoders import Encoder
from redis.backoff import NoBackoff
from redis.commands.core import Script
from redis.exceptions import RedisClusterException
from redis.retry import Retry

from aleatoria.errors import StoreUnavailable
from aleatoria.metrics import REGISTRY
from aleatoria.store import redis_history as history
from aleatoria.store import redis_presence as presence
from aleatoria.store import redis_scripts as lua
from aleatoria.store import redis_search as search_lua
from aleatoria.store import redis_stamp as stamp
from aleatoria.store.redis_batch import Batch, Job, Scripted, Skipped, run_batch

T = TypeVar("T")

_HEALTH_CHECK_SECONDS = 30


# Latency of successful Redis calls, as the worker thread saw them (a thread-safe
# prometheus-client metric is fine here: this is the slow path, never per delivery).
CALL_DURATION = Histogram(
    "aleatoria_redis_call_duration_seconds",
    "Redis call latency (successful calls)",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
    registry=REGISTRY,
)


class Scripts:
    """The store's Lua scripts, registered on one client. Called as ``Script`` objects,
    redis-py reloads them on NOSCRIPT; the writer sends ``room_append``, ``dm_append`` and
    ``room_send`` as raw EVALSHA in its pipelines (no SCRIPT EXISTS round trip per batch), so
    ``load`` must have run on the current Redis (the store does it on every (re)connection, and a
    NOSCRIPT there means Redis restarted: the store resyncs)."""

    def __init__(self) -> None:
        # Scripts are always called with the client to use, so they are registered on a
        # stand-in that only provides the encoder (the same for a cluster).
        owner: Any = _EncoderOnly()
        self.set_available = Script(owner, lua.SET_AVAILABLE)
        self.hangup = Script(owner, lua.HANGUP)
        self.match_between = Script(owner, lua.MATCH_BETWEEN)
        self.request_peer = Script(owner, lua.REQUEST_PEER)
        self.sync_user = Script(owner, lua.SYNC_USER)
        self.join_room = Script(owner, lua.JOIN_ROOM)
        self.leave_room = Script(owner, lua.LEAVE_ROOM)
        self.rooms = Script(owner, lua.ROOMS)
        self.dm_append = Script(owner, lua.DM_APPEND)
        self.room_append = Script(owner, stamp.ROOM_APPEND)
        self.room_send = Script(owner, stamp.ROOM_SEND)
        self.room_read = Script(owner, history.ROOM_READ)
        self.dm_read = Script(owner, history.DM_READ)
        self.heartbeat = Script(owner, presence.HEARTBEAT)
        self.connect = Script(owner, presence.CONNECT)
        self.disconnect = Script(owner, presence.DISCONNECT)
        self.reap = Script(owner, presence.REAP)
        self.route = Script(owner, presence.ROUTE)
        self.block = Script(owner, lua.BLOCK)
        self.admit = Script(owner, lua.ADMIT)
        self.dm_partner = Script(owner, lua.DM_PARTNER)
        self.report_count = Script(owner, lua.REPORT_COUNT)
        self.available = Script(owner, search_lua.AVAILABLE)
        self.search = Script(owner, search_lua.SEARCH)
        self.cancel_search = Script(owner, search_lua.CANCEL)
        self.search_tick = Script(owner, search_lua.TICK)
        self.lost_searchers = Script(owner, search_lua.LOST_SEARCHERS)
        self.restore_profiles = Script(owner, search_lua.RESTORE_PROFILES)
        self._all = list(vars(self).values())

    def load(self, client: Any) -> None:
        """SCRIPT LOAD every script (idempotent; on a cluster, on every primary)."""
        if isinstance(client, redis.cluster.RedisCluster):
            for script in self._all:
                client.script_load(script.script)
            return
        pipe = client.pipeline(transaction=False)
        for script in self._all:
            pipe.script_load(script.script)
        pipe.execute()


class _EncoderOnly:
    def get_encoder(self) -> Encoder:
        return Encoder("utf-8", "strict", False)  # type: ignore[no-untyped-call]


def cluster_url(url: str) -> tuple[str, bool]:
    """``url`` with a ``+cluster`` scheme suffix removed, and whether it had one."""
    scheme, sep, rest = url.partition("://")
    if sep and scheme.endswith("+cluster"):
        return f"{scheme[: -len('+cluster')]}://{rest}", True
    return url, False


def describe_url(url: str) -> str:
    """``url`` without its credentials, for logs."""
    parts = urlsplit(url)
    host = parts.hostname or "?"
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


class RedisClient:
    """A redis-py client used only from worker threads, through ``call``."""

    def __init__(
        self,
        url: str,
        *,
        connect_timeout: float,
        call_timeout: float,
        threads: int = 8,
        cluster: bool = False,
    ) -> None:
        self.url = describe_url(url)
        plain_url, tagged = cluster_url(url)
        self.cluster = cluster or tagged
        self._options: dict[str, Any] = {
            "socket_connect_timeout": connect_timeout,
            "socket_timeout": call_timeout,
            "retry": Retry(NoBackoff(), 0),
            "health_check_interval": _HEALTH_CHECK_SECONDS,
            "protocol": 2,
            "client_name": "aleatoria",
        }
        self._plain_url = plain_url
        self._client: Any = None if self.cluster else redis.Redis.from_url(plain_url, **self._options)
        self._create_lock = threading.Lock()
        self.scripts = Scripts()
        self._limiter = trio.CapacityLimiter(threads)
        self._batch: Batch | None = None  # the script calls of this scheduler pass
        self.batches = 0  # batches sent (``calls`` counts their calls too)
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

        if isinstance(fn, Scripted) and not abandon_on_cancel:
            value: T = await self._batched(fn, gate)
            return value

        def run() -> tuple[T, float]:
            if gate is not None and not gate():
                raise _Skipped("skipped: the store is degraded")
            started = time.perf_counter()
            try:
                return fn(self.redis), time.perf_counter() - started
            except (redis.RedisError, RedisClusterException, OSError) as exc:
                raise StoreUnavailable(describe_error(exc)) from exc

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
        CALL_DURATION.observe(seconds)
        return result

    async def _batched(self, fn: Scripted, gate: Callable[[], bool] | None) -> Any:
        """``fn`` in this scheduler pass's batch (see ``redis_batch``). Cancellation waits
        for the batch (it is the answer of every task in it), bounded by the socket timeouts."""
        job = Job(fn, gate)
        batch = self._batch
        if batch is not None:
            batch.jobs.append(job)
            with trio.CancelScope(shield=True):
                await batch.done.wait()
        else:
            batch = self._batch = Batch([job])
            try:
                await trio.lowlevel.cancel_shielded_checkpoint()  # the pass's other calls join
            finally:
                self._batch = None
            try:
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(
                        run_batch, lambda: self.redis, batch, describe_error, limiter=self._limiter
                    )
            finally:
                batch.done.set()
            self.calls += len(batch.jobs)
            self.batches += 1
            self.call_seconds += batch.seconds
            CALL_DURATION.observe(batch.seconds)
        if job.error is not None:
            if not isinstance(job.error, Skipped):
                self.failures += 1
            raise job.error
        return job.value

    @property
    def redis(self) -> Any:
        """The redis-py client (``redis.Redis`` or ``RedisCluster``). On a cluster the first
        use connects, so use it on a worker thread; raises what redis-py raises."""
        client = self._client
        if client is None:
            with self._create_lock:
                client = self._client
                if client is None:
                    client = self._client = redis.cluster.RedisCluster.from_url(
                        self._plain_url, **self._options
                    )
        return client

    def close(self) -> None:
        """Close every pooled connection (sync and quick: sockets are just closed)."""
        client = self._client
        if client is None:
            return
        client.close()
        if self.cluster:
            # RedisCluster.close leaves each node's own pool connected.
            for node in client.get_nodes():
                if node.redis_connection is not None:
                    node.redis_connection.connection_pool.disconnect()
        else:
            client.connection_pool.disconnect()


_Skipped = Skipped  # the call was not made: the store went degraded while it waited


def describe_error(exc: BaseException) -> str:
    text = str(exc).strip().replace("\n", " ")[:200]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def text(value: bytes | str) -> str:
    """A Redis reply as text (the clients return bytes)."""
    return value.decode() if isinstance(value, bytes) else value


def text_or_none(value: bytes | str | None) -> str | None:
    return None if value is None else text(value)


def present(*users: str | None) -> list[str]:
    """The users that are set (scripts take only the ones there are)."""
    return [user for user in users if user]
