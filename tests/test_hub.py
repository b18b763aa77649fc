"""The room broadcaster's batching, on trio's mock clock: after a batch that joined several
frames, the next frame waits ``linger`` for company (one send per member for all of them);
a lone message goes out at once."""

from __future__ import annotations

import attrs
import trio
import trio.testing

from aleatoria.hub import _BATCH_BYTES, _BATCH_FRAMES, ROOM_QUEUE_FRAMES, Client, Hub, open_hub
from aleatoria.limits import RateLimiter

LINGER = 0.010


@attrs.define
class _Recorder:
    """Stands in for a WebSocket: records each send with the (mock) time it happened."""

    sends: list[tuple[float, bytes, int]] = attrs.Factory(list)
    close_code: int | None = None

    def send_now(self, data: bytes, frames: int = 1) -> None:
        self.sends.append((trio.current_time(), data, frames))


def _queue(hub: Hub, *frames: bytes) -> None:
    """Queue ``frames`` for room Den at once, as the connections handled in one scheduling
    round do (``Hub.broadcast`` awaits the channel, and trio may run the broadcaster at that
    checkpoint, so it cannot place two frames in the queue together)."""
    for frame in frames:
        hub.rooms["Den"].send.send_nowait(frame)


def _join(hub: Hub, user: str, ws: _Recorder) -> None:
    hub.join(Client(user=user, ws=ws, limiter=RateLimiter(0, 1, 1)), "Den")  # type: ignore[arg-type]


async def test_frames_wait_for_company_only_after_a_batch_found_some(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_hub(LINGER) as hub:
        members = [_Recorder() for _ in range(3)]
        for n, ws in enumerate(members):
            _join(hub, f"u{n}", ws)

        async def broadcast(*frames: bytes) -> None:
            _queue(hub, *frames)
            await trio.testing.wait_all_tasks_blocked()

        t0 = trio.current_time()
        await broadcast(b"a")  # a lone message goes out at once
        await broadcast(b"b", b"c")  # queued together: one send, still at once
        assert [(t0, b"a", 1), (t0, b"bc", 2)] == members[0].sends

        # That batch had company, so the next frame waits LINGER for more.
        await broadcast(b"d")
        assert len(members[0].sends) == 2
        await broadcast(b"e")
        await trio.sleep(LINGER)  # mock time
        await trio.testing.wait_all_tasks_blocked()
        assert (t0 + LINGER, b"de", 2) == members[0].sends[-1]

        # Still busy: "f" waits too, finds no company, and so "g" goes out at once.
        await broadcast(b"f")
        await trio.sleep(LINGER)
        await trio.testing.wait_all_tasks_blocked()
        t1 = trio.current_time()
        await broadcast(b"g")
        assert [(t0 + 2 * LINGER, b"f", 1), (t1, b"g", 1)] == members[0].sends[-2:]
        for ws in members:
            assert ws.sends == members[0].sends
        assert hub.deliveries == 7 * len(members)


async def test_linger_zero_sends_every_frame_at_once(autojump_clock: trio.testing.MockClock) -> None:
    async with open_hub(0.0) as hub:
        ws = _Recorder()
        _join(hub, "solo", ws)
        start = trio.current_time()
        for frames in ((b"a", b"b"), (b"c",)):
            _queue(hub, *frames)
            await trio.testing.wait_all_tasks_blocked()
        assert [(start, b"ab", 2), (start, b"c", 1)] == ws.sends


async def test_a_full_room_queue_makes_the_sender_wait(autojump_clock: trio.testing.MockClock) -> None:
    """``broadcast`` queues without a checkpoint while there is space; when the queue is full
    it waits for the broadcaster, slowing the sender and losing nothing."""
    async with open_hub(LINGER) as hub:
        ws = _Recorder()
        _join(hub, "solo", ws)
        _queue(hub, b"a", b"b")
        await trio.testing.wait_all_tasks_blocked()  # sent together: the next batch lingers
        t0 = trio.current_time()
        # One frame goes straight to the waiting broadcaster, the rest fill the queue.
        _queue(hub, *(b"." for _ in range(ROOM_QUEUE_FRAMES + 1)))
        await hub.broadcast("Den", b"z")  # the queue is full until the linger ends
        assert trio.current_time() == t0 + LINGER
        await trio.testing.wait_all_tasks_blocked()
        # A full batch is followed at once by the next: the backlog drains without lingers.
        assert trio.current_time() == t0 + LINGER
        assert b"".join(data for _, data, _ in ws.sends) == b"ab" + b"." * (ROOM_QUEUE_FRAMES + 1) + b"z"
        assert {t for t, _, _ in ws.sends[1:]} == {t0 + LINGER}


async def test_broadcast_now_batches_as_the_broadcaster_and_can_leave_out_one_member() -> None:
    """``broadcast_now`` (Redis' copies, the bus's fallback) joins frames into the same
    batches as the broadcaster (at most ``_BATCH_FRAMES`` frames, ``_BATCH_BYTES`` bytes a
    send); ``exclude`` leaves one user out (a room message's sender while its copy waits for
    Redis), and the counters count what was handed over."""
    async with open_hub(0.0) as hub:
        members = {user: _Recorder() for user in ("u0", "u1", "u2")}
        for user, ws in members.items():
            _join(hub, user, ws)
        frames = [b"%03d" % n for n in range(_BATCH_FRAMES + 1)]
        hub.broadcast_now("Den", frames, exclude="u1")
        expected = [b"".join(frames[:_BATCH_FRAMES]), frames[-1]]
        assert expected == [data for _, data, _ in members["u0"].sends]
        assert [_BATCH_FRAMES, 1] == [count for _, _, count in members["u0"].sends]
        assert [data for _, data, _ in members["u2"].sends] == expected
        assert [] == members["u1"].sends
        big = [b"x" * (_BATCH_BYTES // 2)] * 3
        hub.broadcast_now("Den", big)
        sizes = [len(data) for _, data, _ in members["u1"].sends]
        assert [_BATCH_BYTES, _BATCH_BYTES // 2] == sizes
        assert (len(frames) + 3, 2 * len(frames) + 3 * 3) == (hub.broadcasts, hub.deliveries)


@attrs.define
class _Channels:
    """Stands in for the bus's room channels: records what the hub asks for."""

    calls: list[tuple[str, str]] = attrs.Factory(list)

    def subscribe_room(self, room: str) -> None:
        self.calls.append(("subscribe", room))

    def unsubscribe_room(self, room: str) -> None:
        self.calls.append(("unsubscribe", room))


async def test_the_hub_subscribes_a_room_from_its_first_local_member_to_its_last() -> None:
    """A hub opened with the bus's room channels subscribes a room's channel when its first
    local member joins and unsubscribes it after its last leaves, once each."""
    channels = _Channels()
    async with open_hub(0.0, channels) as hub:
        clients = [Client(user=f"u{n}", ws=_Recorder(), limiter=RateLimiter(0, 1, 1)) for n in range(2)]  # type: ignore[arg-type]
        for client in clients:
            hub.attach(client)
            hub.join(client, "Den")
        assert [("subscribe", "Den")] == channels.calls
        hub.leave(clients[0], "Den")
        assert [("subscribe", "Den")] == channels.calls
        assert ["Den"] == hub.detach(clients[1])
        assert [("subscribe", "Den"), ("unsubscribe", "Den")] == channels.calls
