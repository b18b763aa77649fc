"""This instance's own room messages on their way through Redis: delivered here exactly once.

How this works. A room message this instance publishes reaches its local members when its
copy comes back on the room's channel (its "echo"). When Redis is slow or fails, the bus
gives up waiting and the caller delivers the message locally instead (``done(None)``);
Redis may still publish it, late. ``Echoes`` follows each such message from the moment it
is queued until nothing can deliver it a second time; whichever comes first, the echo or
giving up, delivers it, and the other is dropped:

- waiting: nobody here has it yet. Its echo delivers it (and the entry ends; ``done`` gets
  the count, or 1 if Redis' reply has not come yet). Giving up (a stall, a failed
  pipeline, the subscription or the room's channel lost) calls ``done(None)``: the caller
  delivers it, and the entry turns local.
- local: delivered here by the caller. Its echo, if one comes, is dropped (the entry ends).

An entry whose echo can no longer come ends at once: its publish was never sent, or it ran
(Redis replied) before the subscription was lost (the next connection does not replay it).
An echo is sure to come when the publish ran on the subscription that had already
confirmed the room's channel when the message was queued (Redis runs commands in order), so
a waiting entry keeps waiting for it; otherwise -- the pipeline failed (it may have run, or
run later), or the channel was not confirmed -- the entry gives up and expires ``grace``
seconds later. A failed pipeline's entries start that wait only once Redis answers a later
pipeline (``answered``): a hung Redis runs the commands a timed-out client had sent when it
resumes, before it notices that client gone, so their copies may come any time until then
(a red-team run: a 9 s hang delivered every such message twice when the wait began at the
failure). Every entry whose pipeline has returned expires, even a sure one (a
subscription that dies silently never brings its echo): a waiting one is then given up
and kept one more ``grace``, a local one ends. An echo that arrives after its entry expired
would be a second delivery; that takes a Redis later than ``grace`` on a live connection.
Entries whose pipeline has not returned are bounded by the bus's outbox and the pipeline in
flight (the stall watchdog gives up on them after ``STALL_SECONDS``, and the pipeline's
socket timeout ends it); the ones that expire, and the failed pipelines' ones waiting for
Redis to answer, are each also capped at ``limit`` (the oldest go first, counted in
``forgotten``).

Pure bookkeeping on the trio thread: no I/O; times are passed in.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator

import attrs

Done = Callable[[int | None], None]


@attrs.define(eq=False)
class Echo:
    """One room message of this instance, from its publish until it is settled here."""

    message: bytes  # its key (``redis_stamp.echo_key``)
    channel: str
    done: Done | None
    sure: bool  # its echo is sure to come once it was published (see the module doc)
    local: bool = False  # delivered here by the caller: drop the echo
    published: int | None = None  # Redis' reply (subscribers reached), once it came
    returned: bool = False  # the pipeline returned (published or failed)
    expires: float | None = None
    gone: bool = False


class Echoes:
    """The table of ``Echo`` entries, by message key (``redis_stamp.echo_key``: the message
    without its time, which Redis replaces; the same key twice: oldest first)."""

    def __init__(self, *, grace: float, limit: int) -> None:
        self._grace = grace
        self._limit = max(1, limit)
        self._table: dict[bytes, deque[Echo]] = {}
        self._size = 0
        self._expiring: deque[Echo] = deque()  # in order of expiry (the grace is constant)
        self._expiring_live = 0
        self._unanswered: deque[Echo] = deque()  # failed pipelines': until Redis answers
        self.dropped = 0  # echoes dropped: delivered here already
        self.forgotten = 0  # entries dropped to keep within ``limit``

    def __len__(self) -> int:
        return self._size

    def __iter__(self) -> Iterator[Echo]:
        for entries in self._table.values():
            yield from entries

    # -- the publish ---------------------------------------------------------------------

    def expect(self, message: bytes, channel: str, done: Done | None, *, sure: bool) -> Echo:
        """A room message is queued for publishing."""
        echo = Echo(message, channel, done, sure)
        self._table.setdefault(message, deque()).append(echo)
        self._size += 1
        return echo

    def on_echo(self, message: bytes) -> bool:
        """A room message came from Redis: deliver it here (True), or drop it (False: this
        instance's members have it already)."""
        entries = self._table.get(message)
        if entries is None:
            return True  # another instance's message, or one no longer followed
        echo = entries[0]
        self._end(echo)
        if echo.local:
            self.dropped += 1
            return False
        _call(echo, 1 if not echo.published else echo.published)
        return True

    def give_up(self, echo: Echo, *, sent: bool) -> None:
        """The bus stops waiting for ``echo`` (a stall, Redis failing): the caller delivers it
        now. ``sent``: its publish went out in a pipeline (it may still run)."""
        if echo.gone:
            return
        self._go_local(echo)
        if not sent:
            self._end(echo)  # it never reaches Redis: no echo can come

    def returned(self, echo: Echo, reply: int | None, now: float) -> None:
        """The pipeline that carried ``echo`` returned: ``reply`` subscribers reached, or None
        if it failed (the publish may have run, or may run yet)."""
        if echo.gone or echo.returned:
            return
        echo.returned = True
        if reply is None:
            self._go_local(echo)
            self._unanswered.append(echo)
            while len(self._unanswered) > self._limit:
                oldest = self._unanswered.popleft()
                if not oldest.gone:
                    self.forgotten += 1
                    self._end(oldest)
            return
        if not echo.sure:
            self._go_local(echo)
        else:
            echo.published = reply
        self._expire_at(echo, now + self._grace)

    def answered(self, now: float) -> None:
        """Redis answered a pipeline: what a failed pipeline sent before has run by now, if
        it ever runs, so the failed pipelines' entries expire ``grace`` seconds from now."""
        held, self._unanswered = self._unanswered, deque()
        for echo in held:
            if not echo.gone:
                self._expire_at(echo, now + self._grace)

    # -- the subscription ------------------------------------------------------------------

    def connection_lost(self) -> None:
        """The subscription connection is gone (nothing more is read from it): what it had
        not brought, it never will, and a publish that ran before is not replayed later."""
        for echo in list(self):
            self._go_local(echo)
            echo.sure = False
            if echo.published is not None:
                self._end(echo)

    def channel_dropped(self, channel: str) -> None:
        """The room's channel was unsubscribed (its last local member left): no echo is sure
        any more. (An echo already on its way may still come: entries run to their expiry.)"""
        for echo in list(self):
            if echo.channel == channel:
                self._go_local(echo)
                echo.sure = False

    def expire(self, now: float) -> None:
        """End (or give up, then end later) the entries whose time is up."""
        queue = self._expiring
        while queue and (queue[0].gone or (queue[0].expires or 0.0) <= now):
            echo = queue.popleft()
            if echo.gone:
                continue
            self._expiring_live -= 1
            echo.expires = None
            if echo.local:
                self._end(echo)
            else:
                self._go_local(echo)
                self._expire_at(echo, now + self._grace)

    # -- internals ---------------------------------------------------------------------------

    def _go_local(self, echo: Echo) -> None:
        if not echo.local:
            echo.local = True
            _call(echo, None)

    def _expire_at(self, echo: Echo, when: float) -> None:
        if echo.expires is not None:
            return
        echo.expires = when
        self._expiring.append(echo)
        self._expiring_live += 1
        while self._expiring_live > self._limit:
            oldest = self._expiring.popleft()
            if not oldest.gone:
                self.forgotten += 1
                self._go_local(oldest)
                self._end(oldest)

    def _end(self, echo: Echo) -> None:
        if echo.gone:
            return
        echo.gone = True
        if echo.expires is not None:
            self._expiring_live -= 1
            echo.expires = None
        entries = self._table[echo.message]
        if entries[0] is echo:
            entries.popleft()
        else:
            entries.remove(echo)
        if not entries:
            del self._table[echo.message]
        self._size -= 1


def _call(echo: Echo, reached: int | None) -> None:
    done, echo.done = echo.done, None
    if done is not None:
        done(reached)
