"""Script calls of many tasks in one pipeline: one worker-thread hop and one round trip.

Why. Every Redis call is a hop to a worker thread and back (the trio loop never blocks), and
under load those hops, not Redis, are the cost: measured on the matchmaking scenario (200
users, one instance), Redis answered each script in ~40 us while the server spent ~0.5 ms of
CPU per call and queued them behind its threads, so a request waited milliseconds (and,
waiting, crossed with other requests: PROTOCOL.md section 4's resend).

How this works. A ``Scripted`` value names script calls to make in order (one, or two for
``pool_then_request_peer``); given to ``RedisClient.call``, it joins the open batch. The
first task to open a batch lets the rest of the scheduler pass run (one checkpoint, so every
task that calls in the same pass joins), closes the batch and sends it: one thread runs all
its scripts as one request of EVALSHAs (``redis_request``: a pipeline's bytes without its
bookkeeping), and each task gets its own results. Redis runs a
pipeline's commands back to back, so a task's own calls are never interleaved with others'.
A script Redis no longer knows (NOSCRIPT: it restarted) is run again alone through redis-py's
``Script``, which loads it. On a Redis Cluster redis-py allows no EVALSHA in a pipeline: the
batch still takes one thread hop, and its calls are made in turn. Errors: a failed connection
fails the whole batch (each task gets ``StoreUnavailable``, as its own call would); a
script's error fails only its task.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import attrs
import redis
import redis.cluster
import trio
from redis.commands.core import Script
from redis.exceptions import NoScriptError, RedisClusterException

from aleatoria.errors import StoreUnavailable
from aleatoria.store.redis_request import Request

ScriptCall = tuple[Script, Sequence[str], Sequence[Any]]


@attrs.frozen
class Scripted:
    """Script calls to make in order, as one store command. Called directly (``fn(r)``), it
    runs them one by one; ``RedisClient.call`` batches it instead. Its value: the one
    script's result, or the list of results when there are several."""

    calls: tuple[ScriptCall, ...]
    # A peer request's user, and which call is the pick: a pick is told the users whose own
    # requests come after it in the same batch, and leaves them alone (see ``run_batch``).
    requester: str | None = None
    pick: int | None = None

    def __call__(self, r: Any) -> Any:
        results = [script(list(keys), list(args), client=r) for script, keys, args in self.calls]
        return results[0] if len(results) == 1 else results

    def value(self, results: list[Any]) -> Any:
        return results[0] if len(results) == 1 else results


def scripted(script: Script, keys: Sequence[str], args: Sequence[Any]) -> Scripted:
    return Scripted(((script, keys, args),))


@attrs.define(eq=False)
class Job:
    fn: Scripted
    gate: Callable[[], bool] | None
    value: Any = None
    error: StoreUnavailable | None = None


@attrs.define(eq=False)
class Batch:
    jobs: list[Job] = attrs.Factory(list)
    done: trio.Event = attrs.Factory(trio.Event)
    seconds: float = 0.0


class Skipped(StoreUnavailable):
    """The call was not made: the store went degraded while it waited for a thread."""


def run_batch(get_client: Callable[[], Any], batch: Batch, describe: Callable[[BaseException], str]) -> None:
    """Send ``batch`` (on a worker thread; ``get_client`` gives the redis-py client, which
    may connect); every job ends with a value or an error."""
    live = []
    for job in batch.jobs:
        if job.gate is not None and not job.gate():
            job.error = Skipped("skipped: the store is degraded")
        else:
            live.append(job)
    if not live:
        return
    started = time.perf_counter()
    try:
        client = get_client()
        if isinstance(client, redis.cluster.RedisCluster):
            # redis-py refuses EVALSHA in a cluster pipeline: one thread hop, calls in turn.
            _run_each(client, live, describe)
            return
        request = Request()
        for index, job in enumerate(live):
            later = _later_requesters(live, index) if job.fn.pick is not None else ()
            for position, (script, keys, args) in enumerate(job.fn.calls):
                extra = later if position == job.fn.pick else ()
                request.command("EVALSHA", script.sha, len(keys), *keys, *args, *extra)
        results = request.send(client, raise_on_error=False)
    except (redis.RedisError, RedisClusterException, OSError) as exc:
        for job in live:
            job.error = StoreUnavailable(describe(exc))
        return
    finally:
        batch.seconds = time.perf_counter() - started
    position = 0
    for job in live:
        mine = results[position : position + len(job.fn.calls)]
        position += len(job.fn.calls)
        failed = next((r for r in mine if isinstance(r, Exception)), None)
        if failed is None:
            job.value = job.fn.value(mine)
        elif isinstance(failed, NoScriptError):
            try:
                job.value = job.fn(client)  # loads the scripts (Redis restarted)
            except (redis.RedisError, RedisClusterException, OSError) as exc:
                job.error = StoreUnavailable(describe(exc))
        else:
            job.error = StoreUnavailable(describe(failed))


def _run_each(client: Any, jobs: list[Job], describe: Callable[[BaseException], str]) -> None:
    for job in jobs:
        try:
            job.value = job.fn(client)
        except (redis.RedisError, RedisClusterException, OSError) as exc:
            job.error = StoreUnavailable(describe(exc))


def _later_requesters(jobs: list[Job], index: int) -> tuple[str, ...]:
    """Users whose peer requests come after job ``index`` in the batch. Two requests of one
    pass are concurrent; picking a user whose own request is about to run would only send
    that request this match again (a crossed request: clients take it for no answer), so the
    earlier pick leaves such users to their own requests (which may pick the earlier
    requester: the pair still meets)."""
    requester = jobs[index].fn.requester
    return tuple(
        user for job in jobs[index + 1 :] if (user := job.fn.requester) is not None and user != requester
    )
