#!/usr/bin/env python3
"""CPU per room message and per DM, memory mode against Redis mode, without sockets.

The real store, hub, router and sessions run in this process with sockets that only
count; every frame goes through ``Session.handle``, as a connection's would. What is
measured is the whole per-message path, the part the loop runs later included: in Redis
mode the writer's pipeline on a worker thread, the subscriber thread's read and hand-over,
the echo bookkeeping and the fan-out of what comes back; in memory mode the room's
broadcaster task. CPU is the process's (every thread), split into the trio thread and
the others (``/proc/self/task``), so redis-server's own CPU is not in it.

Traffic like the reference generator's, paced so batches stay as small as in a live run:
- room: ``--rooms`` rooms of ``--members`` members, ``--senders`` of them sending, each with
  at most ``--window`` messages of its own not yet back (its own copy is its ack);
- dm: ``--pairs`` pairs, each a ping-pong (a round trip: A to B, then B to A; each waits
  for its own copy before the next).

It starts nothing: give it a running redis-server (``--redis-url``; it flushes that
database first). Without one, only memory mode is measured.

    redis-server --port 6391 --save '' --appendonly no --daemonize yes
    python scripts/redis_message_cost.py --redis-url redis://127.0.0.1:6391/0
    python scripts/redis_message_cost.py --redis-url redis://127.0.0.1:6391/0 --profile 12
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import trio

from aleatoria.config import Config
from aleatoria.flusher import open_flusher
from aleatoria.hub import open_hub
from aleatoria.server import Server
from aleatoria.session import Session
from aleatoria.store import open_store


class CountingSocket:
    """Stands in for the WebSocket: counts the frames it is sent, and wakes whoever waits
    for a count."""

    closing = False

    def __init__(self) -> None:
        self.sent = 0
        self.sends = 0
        self.close_code: int | None = None
        self.last_seen = 0.0
        self._want = 0
        self._event: trio.Event | None = None

    def send(self, data: bytes, frames: int = 1) -> None:
        self.sent += frames
        self.sends += 1
        event = self._event
        if event is not None and self.sent >= self._want:
            self._event = None
            event.set()

    send_now = send

    def flush(self) -> None:
        pass

    def close(self, code: int, reason: str = "") -> None:
        self.close_code = code

    async def wait_for(self, count: int) -> None:
        while self.sent < count:
            self._want = count
            self._event = event = trio.Event()
            await event.wait()


# Below this many clock ticks of CPU in a measurement, the per-unit figure is too coarse to
# compare (a step of over 5 %): the script says so. The defaults measure about 25 (memory mode).
MIN_TICKS = 20


def _thread_cpu() -> tuple[float, float]:
    """CPU seconds of this process so far: (the main thread, every other thread)."""
    tick = os.sysconf("SC_CLK_TCK")
    main = other = 0.0
    pid = os.getpid()
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue  # a thread that ended meanwhile
        seconds = (int(fields[11]) + int(fields[12])) / tick
        if int(tid) == pid:
            main += seconds
        else:
            other += seconds
    return main, other


class Profiles:
    """cProfile on every thread: the trio thread's, and one per thread started after
    ``install`` (the worker threads and the subscriber's)."""

    def __init__(self) -> None:
        self.profiles: list[tuple[bool, cProfile.Profile]] = []
        self.on = False

    def install(self) -> None:
        threading.setprofile(self._start_in_thread)

    def _start_in_thread(self, *_: Any) -> None:
        if threading.current_thread() is threading.main_thread():
            return
        profile = cProfile.Profile()
        self.profiles.append((False, profile))
        profile.enable()

    def start(self) -> None:
        # The other threads' profiles run from their start (``snapshot`` subtracts set-up).
        self.main = cProfile.Profile()
        self.profiles.append((True, self.main))
        self.main.enable()

    def stop(self) -> None:
        self.main.disable()
        threading.setprofile(None)  # type: ignore[arg-type]

    def report(self, label: str, units: int, top: int, since: dict[Any, int]) -> None:
        for is_main, title in ((True, "trio thread"), (False, "other threads")):
            chosen = [p for main, p in self.profiles if main == is_main]
            if not chosen:
                continue
            stats = pstats.Stats(chosen[0])
            for profile in chosen[1:]:
                stats.add(profile)
            table: dict[Any, int] = {}
            for func, (_cc, nc, *_rest) in stats.stats.items():  # type: ignore[attr-defined]
                calls = nc - (since.get(func, 0) if not is_main else 0)
                if calls > 0:
                    table[func] = calls
            total = sum(table.values())
            print(f"  {label} {title}: {total / units:.1f} calls per unit")
            for func, calls in sorted(table.items(), key=lambda kv: -kv[1])[:top]:
                file, line, name = func
                where = f"{os.path.basename(file)}:{line}" if file != "~" else ""
                print(f"    {calls / units:8.2f}  {name} {where}")

    def snapshot(self) -> dict[Any, int]:
        """Calls so far on the other threads (set-up, to subtract)."""
        out: dict[Any, int] = {}
        for is_main, profile in self.profiles:
            if is_main:
                continue
            profile.create_stats()
            profile.enable()
            for func, (_, nc, *_rest) in profile.stats.items():  # type: ignore[attr-defined]
                out[func] = out.get(func, 0) + nc
        return out


async def _sessions(server: Server, users: list[str], room: str) -> list[tuple[Session, CountingSocket]]:
    out = []
    for user in users:
        ws = CountingSocket()
        session = server.new_session(ws, user)  # type: ignore[arg-type]
        await server.start_session(session, room)
        out.append((session, ws))
    return out


async def _room_traffic(server: Server, args: argparse.Namespace, tag: str) -> Callable[[], Any]:
    """Set the rooms up; return the coroutine function that sends ``args.count`` room
    messages in all and returns once every member has every message."""
    rooms: list[tuple[list[tuple[Session, CountingSocket]], str]] = []
    for r in range(args.rooms):
        name = f"{tag}room{r}"
        members = await _sessions(server, [f"{tag}r{r}m{i}" for i in range(args.members)], name)
        rooms.append((members, name))
    per_sender = args.count // (args.rooms * args.senders)

    async def sender(session: Session, ws: CountingSocket, room: str, base: int) -> None:
        frame = json.dumps(
            {"type": "chat_message", "room": room, "payload": {"content": "hello there, room"}}
        ).encode()
        # The sender's socket gets every message of the room; its own are a share of them.
        # Pace on the room's total: at most senders x window not back yet.
        for n in range(per_sender):
            await ws.wait_for(base + (n - args.window + 1) * args.senders)
            await session.handle(frame)

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            for members, room in rooms:
                base = members[0][1].sent
                for session, ws in members[: args.senders]:
                    nursery.start_soon(sender, session, ws, room, base)
        total = per_sender * args.senders
        for members, _ in rooms:
            for _, ws in members:
                await ws.wait_for(ws_base[id(ws)] + total)

    ws_base = {id(ws): ws.sent for members, _ in rooms for _, ws in members}
    sockets = [ws for members, _ in rooms for _, ws in members]

    def frames_per_send() -> float:
        return sum(ws.sent for ws in sockets) / max(1, sum(ws.sends for ws in sockets))

    run.frames_per_send = frames_per_send  # type: ignore[attr-defined]
    run.units = per_sender * args.senders * args.rooms  # type: ignore[attr-defined]
    return run


async def _dm_traffic(server: Server, args: argparse.Namespace, tag: str) -> Callable[[], Any]:
    pairs = []
    for p in range(args.pairs):
        a, b = await _sessions(server, [f"{tag}a{p}", f"{tag}b{p}"], f"{tag}lobby{p}")
        pairs.append((a, b))
    per_pair = args.count // args.pairs

    def frame(to: str) -> bytes:
        return json.dumps({"type": "chat_message", "toUser": to, "payload": {"content": "hello"}}).encode()

    async def pair(a: tuple[Session, CountingSocket], b: tuple[Session, CountingSocket]) -> None:
        to_b, to_a = frame(b[0].user), frame(a[0].user)
        for _ in range(per_pair):
            # A round trip: A writes, B reads it; B answers, A reads it (each also gets
            # its own copy, its acknowledgement).
            want_a, want_b = a[1].sent, b[1].sent
            await a[0].handle(to_b)
            await b[1].wait_for(want_b + 1)
            await a[1].wait_for(want_a + 1)
            await b[0].handle(to_a)
            await a[1].wait_for(want_a + 2)
            await b[1].wait_for(want_b + 2)

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            for a, b in pairs:
                nursery.start_soon(pair, a, b)

    run.units = per_pair * args.pairs  # type: ignore[attr-defined]
    return run


def _redis_calls(store: Any) -> tuple[int, int] | None:
    """Redis calls (thread hops) and subscriber hand-overs so far; None in memory mode."""
    keeper = getattr(store, "keeper", None)
    if keeper is None:
        return None
    return keeper.client.calls, getattr(store.redis_bus, "batches", 0)  # 0: before it counted


async def measure(args: argparse.Namespace, url: str | None, profiles: Profiles | None) -> dict[str, float]:
    config = Config(port=0, rate_limit=0, redis_url=url)
    results: dict[str, float] = {}
    async with (
        open_store(config) as store,
        open_hub(config.room_linger, store.bus) as hub,
        open_flusher() as flusher,
    ):
        server = Server(config, store, hub, flusher)
        for kind in args.kinds:
            make = _room_traffic if kind == "room" else _dm_traffic
            run = await make(server, args, kind[0])
            units: int = run.units  # type: ignore[attr-defined]
            await trio.sleep(0.2)  # let the joins' writes settle before the clock starts
            since = profiles.snapshot() if profiles else {}
            if profiles:
                profiles.start()
            calls0 = _redis_calls(store)
            main0, other0 = _thread_cpu()
            wall0 = time.perf_counter()
            await run()
            wall = time.perf_counter() - wall0
            main1, other1 = _thread_cpu()
            if profiles:
                profiles.stop()
                profiles.report(kind, units, args.profile, since)
            results[f"{kind}_main_us"] = (main1 - main0) / units * 1e6
            results[f"{kind}_other_us"] = (other1 - other0) / units * 1e6
            results[f"{kind}_cpu_us"] = results[f"{kind}_main_us"] + results[f"{kind}_other_us"]
            results[f"{kind}_per_s"] = units / wall
            # /proc counts CPU in clock ticks (10 ms): the figures above are multiples of this.
            results[f"{kind}_cpu_ticks"] = round((main1 - main0 + other1 - other0) * os.sysconf("SC_CLK_TCK"))
            results[f"{kind}_tick_us"] = 1e6 / os.sysconf("SC_CLK_TCK") / units
            if hasattr(run, "frames_per_send"):
                results[f"{kind}_frames_per_send"] = run.frames_per_send()
            if calls0 is not None:
                calls1 = _redis_calls(store)
                assert calls1 is not None
                results[f"{kind}_calls"] = (calls1[0] - calls0[0]) / units
                results[f"{kind}_bus_batches"] = (calls1[1] - calls0[1]) / units
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--redis-url", help="a running redis-server (its database is flushed)")
    parser.add_argument("--mode", choices=("both", "memory", "redis"), default="both")
    parser.add_argument("--kinds", default="room,dm", help="room, dm or both (comma-separated)")
    parser.add_argument("--count", type=int, default=8000, help="room messages (or round trips) in all")
    parser.add_argument("--rooms", type=int, default=10)
    parser.add_argument("--members", type=int, default=50)
    parser.add_argument("--senders", type=int, default=2)
    parser.add_argument("--window", type=int, default=4)
    parser.add_argument("--pairs", type=int, default=50)
    parser.add_argument("--profile", type=int, default=0, help="print the N most called functions per unit")
    parser.add_argument("--json", action="store_true", help="one JSON line per mode")
    args = parser.parse_args()
    for flag in ("count", "rooms", "members", "senders", "window", "pairs"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be at least 1")
    if args.senders > args.members:
        parser.error("--senders must be at most --members")
    if args.profile < 0:
        parser.error("--profile must not be negative")
    args.kinds = [k for k in args.kinds.split(",") if k]
    if not args.kinds or not set(args.kinds) <= {"room", "dm"}:
        parser.error(f"--kinds: room, dm or both (comma-separated), not {','.join(args.kinds)!r}")
    modes: list[tuple[str, str | None]] = []
    if args.mode in ("both", "memory"):
        modes.append(("memory", None))
    if args.mode in ("both", "redis"):
        if not args.redis_url:
            parser.error("Redis mode needs --redis-url")
        modes.append(("redis", args.redis_url))
    for label, url in modes:
        if url:
            import redis

            with redis.Redis.from_url(url) as r:
                r.flushdb()
        profiles = Profiles() if args.profile else None
        if profiles:
            profiles.install()
            print(f"== {label}")
        figures = trio.run(measure, args, url, profiles)
        for kind in args.kinds:
            ticks = int(figures[f"{kind}_cpu_ticks"])
            if ticks < MIN_TICKS:
                print(
                    f"warning: {label} {kind}: only {ticks} clock ticks of CPU measured, so each figure "
                    f"is a multiple of {figures[f'{kind}_tick_us']:.1f} us: raise --count",
                    file=sys.stderr,
                )
        if args.json:
            print(json.dumps({"mode": label, **{k: round(v, 2) for k, v in figures.items()}}))
            continue
        for kind in args.kinds:
            print(
                f"{label:6} {kind:4}: {figures[f'{kind}_cpu_us']:7.1f} us CPU per "
                f"{'room message' if kind == 'room' else 'round trip'} "
                f"(trio thread {figures[f'{kind}_main_us']:.1f}, other threads "
                f"{figures[f'{kind}_other_us']:.1f}), {figures[f'{kind}_per_s']:,.0f}/s"
                + (
                    f"; per unit {figures[f'{kind}_calls']:.3f} Redis calls, "
                    f"{figures[f'{kind}_bus_batches']:.3f} bus hand-overs"
                    if f"{kind}_calls" in figures
                    else ""
                )
            )


if __name__ == "__main__":
    main()
