"""A user connecting to two ``aleatoria serve`` processes in the same moment, each connection
naming its own room (PROTOCOL.md sections 5 and 16): one connection wins, the other is closed
as replaced, and once the winner has gone too nothing of either is left in Redis -- no
presence and no room membership. The loser's join of its URL room used to land in Redis after
the winner had taken the user's rooms over, so the user stayed a member of that room for
good (in ``list_rooms``, ``get_room_members`` and ``get_stats``)."""

from __future__ import annotations

import orjson
import trio
import trio_websocket
from redis_server import RedisServer
from scaleout_support import redis_client, serve_process, wait_until
from support import connect

from aleatoria.store.redis_presence import PRESENCE_KEY

USERS = 30


class Side:
    """One of a user's two connections, read until the server closes it or the test ends."""

    def __init__(self) -> None:
        self.joined = False
        self.code: int | None = None  # the server's close code
        self.settled = trio.Event()  # joined, or closed
        self.scope = trio.CancelScope()  # cancelled: the client closes cleanly (1000)


class User:
    def __init__(self) -> None:
        self.sides = (Side(), Side())
        self.closed = trio.Event()  # one of its connections was closed by the server


async def _run(port: int, user: str, room: str, owner: User, side: Side, go: trio.Event) -> None:
    await go.wait()
    try:
        async with connect(port, user, room, joined=False) as client:
            with side.scope:
                while True:
                    message = orjson.loads(await client.ws.get_message())
                    if message["type"] == "room_joined" and message.get("room") == room:
                        side.joined = True
                        side.settled.set()
    except* trio_websocket.ConnectionClosed as group:
        closed: BaseException = group
        while isinstance(closed, BaseExceptionGroup):  # the connection's nursery nests it
            closed = closed.exceptions[0]
        assert isinstance(closed, trio_websocket.ConnectionClosed)
        side.code = closed.reason.code if closed.reason else 1006
        owner.closed.set()
    finally:
        side.settled.set()


async def test_a_replaced_connections_room_is_not_left_behind(redis_server: RedisServer) -> None:
    """Every user connects to both instances at once, with room ``a<n>`` on one and ``b<n>``
    on the other. Each ends with one connection closed 4001 and the other joined; when the
    survivors close cleanly, presence and every room's membership are empty."""
    url = redis_server.url
    async with serve_process("--redis-url", url) as one, serve_process("--redis-url", url) as two:
        go = trio.Event()
        sides: dict[str, User] = {}
        async with trio.open_nursery() as nursery:
            for n in range(USERS):
                user = sides[f"u{n}"] = User()
                first, second = user.sides
                nursery.start_soon(_run, one.port, f"u{n}", f"a{n}", user, first, go)
                nursery.start_soon(_run, two.port, f"u{n}", f"b{n}", user, second, go)
            await trio.testing.wait_all_tasks_blocked()
            go.set()
            with trio.fail_after(15):
                for name, user in sides.items():
                    for side in user.sides:
                        await side.settled.wait()
                    # The loser is closed as replaced (perhaps after its room_joined); the
                    # winner joined and stays.
                    await user.closed.wait()
                    assert [4001] == [side.code for side in user.sides if side.code is not None], name
                    assert [True] == [side.joined for side in user.sides if side.code is None], name
            for user in sides.values():
                for side in user.sides:
                    side.scope.cancel()

        users = set(sides)
        with redis_client(url) as r:

            def leftovers() -> dict[str, set[str]]:
                present = {u.decode() for u in r.hkeys(PRESENCE_KEY)} & users
                members: dict[str, set[str]] = {"presence": present} if present else {}
                for key in r.scan_iter("room:members:*"):
                    found = {u.decode() for u in r.smembers(key)} & users
                    if found:
                        members[key.decode()] = found
                for key in r.scan_iter("user:rooms:*"):
                    members[key.decode()] = {room.decode() for room in r.smembers(key)}
                return members

            try:
                await wait_until(lambda: not leftovers(), timeout=10)
            except trio.TooSlowError:
                raise AssertionError(f"left behind: {leftovers()}") from None
