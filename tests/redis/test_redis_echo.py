"""The bookkeeping behind "delivered once" (``redis_echo``), as plain sync tests: each own
room message is delivered here exactly once, by its pub/sub copy or by the caller's
fallback, whichever comes first, and every entry ends."""

from __future__ import annotations

from aleatoria.store.redis_echo import Echoes

GRACE = 5.0


class Fallback:
    """The caller's ``done``: what it was called with."""

    def __init__(self) -> None:
        self.calls: list[int | None] = []

    def __call__(self, reached: int | None) -> None:
        self.calls.append(reached)

    @property
    def delivered_locally(self) -> int:
        return self.calls.count(None)


def _table(limit: int = 100) -> Echoes:
    return Echoes(grace=GRACE, limit=limit)


def test_copy_then_stall_then_late_reply_delivers_once() -> None:
    """The pub/sub copy arrives before Redis' (late) reply: the stall that follows does not
    deliver it again; the entry ended with the copy."""
    echoes, done = _table(), Fallback()
    echo = echoes.expect(b"m", "c", done, sure=True)
    assert echoes.on_echo(b"m")
    echoes.give_up(echo, sent=True)
    echoes.returned(echo, 1, now=0.0)
    assert [1] == done.calls
    assert 0 == len(echoes)


def test_stall_then_copy_drops_the_copy() -> None:
    """The stall gives up first (the caller delivers); the reply and then the copy come
    late: the copy is dropped and the entry ends."""
    echoes, done = _table(), Fallback()
    echo = echoes.expect(b"m", "c", done, sure=True)
    echoes.give_up(echo, sent=True)
    assert [None] == done.calls
    echoes.returned(echo, 1, now=0.0)
    assert 1 == len(echoes)
    assert not echoes.on_echo(b"m")
    assert 0 == len(echoes)
    assert 1 == echoes.dropped
    assert echoes.on_echo(b"m")  # a later identical message from elsewhere is delivered


def test_never_sent_ends_at_once() -> None:
    """Given up before it went out (queued when Redis failed): delivered by the caller, and
    forgotten at once (no copy can come)."""
    echoes, done = _table(), Fallback()
    echo = echoes.expect(b"m", "c", done, sure=True)
    echoes.give_up(echo, sent=False)
    assert [None] == done.calls
    assert 0 == len(echoes)


def test_failed_pipeline_suppresses_a_late_copy_for_the_grace_after_redis_answers() -> None:
    """A failed pipeline's entry is kept while Redis does not answer (it may run the
    pipeline when it does), then for the grace."""
    echoes, done = _table(), Fallback()
    echo = echoes.expect(b"m", "c", done, sure=True)
    echoes.returned(echo, None, now=10.0)
    assert [None] == done.calls
    echoes.expire(10.0 + 10 * GRACE)
    assert 1 == len(echoes)
    echoes.answered(now=100.0)
    echoes.expire(100.0 + GRACE - 0.1)
    assert 1 == len(echoes)
    echoes.expire(100.0 + GRACE)
    assert 0 == len(echoes)


def test_a_hung_redis_runs_the_failed_pipeline_late_and_the_copy_is_dropped() -> None:
    """Redis hangs longer than the call timeout plus the grace (the pipeline timed out and
    the caller delivered the message), then runs the pipeline and publishes it when it
    resumes: its copy is dropped, not delivered a second time."""
    echoes, done = _table(), Fallback()
    echo = echoes.expect(b"m", "c", done, sure=True)
    echoes.give_up(echo, sent=True)  # the stall watchdog
    echoes.returned(echo, None, now=2.0)  # the pipeline's socket timeout
    echoes.expire(9.0)  # still hung, past the grace
    echoes.answered(now=9.1)  # it resumes: the late publish and the next reply
    assert not echoes.on_echo(b"m")
    assert [None] == done.calls
    assert 0 == len(echoes)


def test_failed_pipelines_entries_are_capped() -> None:
    echoes = _table(limit=3)
    for n in range(5):
        echo = echoes.expect(bytes([n]), "c", Fallback(), sure=True)
        echoes.returned(echo, None, now=float(n))
    assert 3 == len(echoes)
    assert 2 == echoes.forgotten
    assert echoes.on_echo(bytes([0]))  # forgotten: no longer recognised
    assert not echoes.on_echo(bytes([4]))


def test_published_waits_for_its_copy_and_gives_up_after_the_grace() -> None:
    """Published on a subscription that had the channel: the copy is awaited; if it never
    comes (a silently dead subscription), the caller delivers after the grace, and a copy
    arriving after that is still dropped for one more grace."""
    echoes, done = _table(), Fallback()
    echo = echoes.expect(b"m", "c", done, sure=True)
    echoes.returned(echo, 2, now=0.0)
    assert [] == done.calls
    echoes.expire(GRACE)
    assert [None] == done.calls
    assert not echoes.on_echo(b"m")
    assert 0 == len(echoes)


def test_not_sure_is_delivered_by_the_caller_when_published() -> None:
    """The channel was not confirmed when the message was queued: its copy may never come,
    so the caller delivers it once Redis replied, and a copy that does come is dropped."""
    echoes, done = _table(), Fallback()
    echo = echoes.expect(b"m", "c", done, sure=False)
    echoes.returned(echo, 1, now=0.0)
    assert [None] == done.calls
    assert not echoes.on_echo(b"m")
    assert 0 == len(echoes)


def test_connection_lost() -> None:
    """The subscription is lost: waiting messages are delivered by the caller; the ones
    already published end (no later connection brings them); the ones in flight are kept
    until their pipeline returns, then for the grace."""
    echoes = _table()
    published, in_flight = Fallback(), Fallback()
    first = echoes.expect(b"a", "c", published, sure=True)
    second = echoes.expect(b"b", "c", in_flight, sure=True)
    echoes.returned(first, 1, now=0.0)
    echoes.connection_lost()
    assert ([None], [None]) == (published.calls, in_flight.calls)
    assert 1 == len(echoes)
    echoes.returned(second, 1, now=1.0)
    assert not echoes.on_echo(b"b")  # published after the new subscription: dropped
    assert 0 == len(echoes)


def test_channel_dropped_only_touches_that_channel() -> None:
    echoes = _table()
    here, there = Fallback(), Fallback()
    echoes.expect(b"a", "c1", here, sure=True)
    echoes.expect(b"b", "c2", there, sure=True)
    echoes.channel_dropped("c1")
    assert ([None], []) == (here.calls, there.calls)
    assert echoes.on_echo(b"b")
    assert [1] == there.calls


def test_same_bytes_twice_are_followed_in_order() -> None:
    echoes = _table()
    first, second = Fallback(), Fallback()
    one = echoes.expect(b"m", "c", first, sure=True)
    echoes.expect(b"m", "c", second, sure=True)
    echoes.give_up(one, sent=True)
    assert not echoes.on_echo(b"m")  # the first one's copy: delivered by the fallback
    assert echoes.on_echo(b"m")  # the second one's copy
    assert ([None], [1]) == (first.calls, second.calls)
    assert 0 == len(echoes)


def test_expiring_entries_are_capped() -> None:
    """Past ``limit`` entries waiting for their expiry, the oldest are forgotten (counted)."""
    echoes = _table(limit=3)
    for n in range(5):
        echo = echoes.expect(bytes([n]), "c", Fallback(), sure=False)
        echoes.returned(echo, 1, now=float(n))
    assert 3 == len(echoes)
    assert 2 == echoes.forgotten
    assert echoes.on_echo(bytes([0]))  # forgotten: no longer recognised
    assert not echoes.on_echo(bytes([4]))
