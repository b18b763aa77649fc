"""A room message is in Redis' history before Redis publishes it (PROTOCOL.md section 16:
what a member saw is stored), even when more history is queued than one pipeline carries:
a publish never rides in a pipeline ahead of the history entries queued before it."""

from __future__ import annotations

import threading
import time

import orjson
import trio
from redis_server import RedisServer
from redis_support import server_config

from aleatoria.store.redis import open_redis_store

BACKLOG = 1500  # about three pipelines' worth (512 entries each)


def _message(content: str, created_ns: int) -> bytes:
    return orjson.dumps(
        {"type": "chat_message", "room": "Den", "payload": {"content": content}, "n": created_ns}
    )


async def test_a_publish_never_goes_ahead_of_its_history_write(redis_server: RedisServer) -> None:
    """With a backlog of history queued, a room message and its publish are queued last;
    Redis' own MONITOR shows the history write of that message executed before its
    PUBLISH."""
    commands: list[str] = []
    ready = threading.Event()

    def watch() -> None:
        with redis_server.client() as r, r.monitor() as monitor:
            ready.set()
            while True:
                command = monitor.next_command()["command"]
                if "LAST" in command:
                    commands.append(command.split(" ", 1)[0].upper())
                    if commands[-1] in ("PUBLISH", "SPUBLISH"):
                        return

    config = server_config(redis_server.url)
    async with open_redis_store(config, redis_server.url) as store, trio.open_nursery() as nursery:
        # The watcher returns once it saw the PUBLISH (its client's socket timeout bounds it).
        nursery.start_soon(trio.to_thread.run_sync, watch)
        await trio.to_thread.run_sync(ready.wait)
        async with store._writer.lock:  # hold the writer while the backlog builds up
            for n in range(BACKLOG):
                created = time.time_ns()
                store.record_room_message("Den", _message(f"m{n}", created), created)
            created = time.time_ns()
            last = _message("LAST", created)
            store.record_room_message("Den", last, created)
            store.redis_bus.publish_room("Den", last)
    # EVALSHA (the room_append script) and the ZADD it runs, then the PUBLISH.
    assert "EVALSHA" == commands[0]
    assert commands[-1] in ("PUBLISH", "SPUBLISH")
    assert 1 == commands.count(commands[-1])
