"""The supervisor: the server's periodic duties, in one task.

Keepalive is done here for all connections at once rather than by a task per connection:
one sweep every tick pings every socket when a ping is due and closes those that have sent
nothing for ``idle_timeout``, and (with auth on) those whose token has run out, with 4002
(PROTOCOL.md section 16). That keeps an idle connection down to one task (its reader).
"""

from __future__ import annotations

import logging

import trio

from aleatoria.config import Config
from aleatoria.frames import GOING_AWAY, TOKEN_EXPIRED
from aleatoria.hub import Hub
from aleatoria.limits import forget_full

log = logging.getLogger("aleatoria.supervisor")

# How late a connection may outlive its token, at most (seconds).
_TOKEN_TICK = 1.0


async def supervise(hub: Hub, config: Config) -> None:
    """Run forever; cancel to stop."""
    tick = min(config.ping_interval, config.idle_timeout) / 4
    if config.auth_secret:
        tick = min(tick, _TOKEN_TICK)
    next_ping = trio.current_time() + config.ping_interval
    while True:
        await trio.sleep(tick)
        now = trio.current_time()
        ping_due = now >= next_ping
        if ping_due:
            next_ping = now + config.ping_interval
        forget_full(hub.match_budgets, now)
        for client in list(hub.clients.values()):
            ws = client.ws
            if now - ws.last_seen > config.idle_timeout:
                log.info("event=idle_timeout user=%s", client.user)
                ws.close(GOING_AWAY, "idle timeout")
            elif client.expires_at is not None and now >= client.expires_at:
                log.info("event=token_expired user=%s", client.user)
                ws.close(TOKEN_EXPIRED, "token expired")
            elif ping_due:
                ws.ping()
