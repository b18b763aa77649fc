"""What operators (and automatic rules) do to users: bans, kicks, a user's state, and where a
stored report goes next (PROTOCOL.md section 13). The HTTP API (``aleatoria.admin``) and the
sessions (a report, an automatic shadow ban) call this; it acts through the store's
``safety`` (kept on every instance) and the router (which reaches the user's instance).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import trio

from aleatoria.metrics import Stats
from aleatoria.router import Router
from aleatoria.safety import Ban
from aleatoria.store import Store
from aleatoria.webhook import Webhook

log = logging.getLogger("aleatoria.moderation")

BANS_COUNTED_EVERY = 30.0


class Moderation:
    def __init__(self, store: Store, router: Router, stats: Stats, webhook: Webhook | None = None) -> None:
        self.store = store
        self.safety = store.safety
        self.router = router
        self.stats = stats
        self.webhook = webhook
        self.bans_active = 0  # as last counted (``count_bans_forever``), for /metrics

    async def count_bans_forever(self, every: float = BANS_COUNTED_EVERY) -> None:
        """Keep ``bans_active`` current (bans end by themselves, and other instances make
        them): a store read every ``every`` seconds."""
        while True:
            self.bans_active = len(await self.safety.bans(time.time()))
            await trio.sleep(every)

    async def ban(self, user: str, *, duration: float | None, reason: str = "", shadow: bool = False) -> Ban:
        """Ban ``user`` for ``duration`` seconds (None: for good). A ban closes its
        connection with 4003 on whatever instance; a shadow ban leaves it connected."""
        now = time.time()
        ban = Ban(user, None if duration is None else now + duration, reason, shadow=shadow, created=now)
        await self.apply(ban)
        return ban

    async def apply(self, ban: Ban) -> None:
        await self.safety.ban(ban)
        self.stats.bans += 1
        self.bans_active = len(await self.safety.bans(time.time()))
        log.info(
            "event=banned user=%s shadow=%s until=%s reason=%r",
            ban.user,
            ban.shadow,
            "never" if ban.until is None else int(ban.until),
            ban.reason,
        )
        self.router.notify_shadow(ban.user, ban.shadow)
        if not ban.shadow:
            self.kick(ban.user, everywhere=True)

    async def unban(self, user: str) -> bool:
        found = await self.safety.unban(user)
        self.bans_active = len(await self.safety.bans(time.time()))
        if found:
            log.info("event=unbanned user=%s", user)
            self.router.notify_shadow(user, False)
        return found

    def kick(self, user: str, *, everywhere: bool = False) -> None:
        """Close ``user``'s connection with 4003, on whatever instance it is (``everywhere``:
        see ``Router.kick``)."""
        self.stats.kicks += 1
        here = self.router.kick(user, everywhere=everywhere)
        log.info("event=kicked user=%s where=%s", user, "here" if here else "routed")

    def report_filed(self, report_id: str, report: dict[str, Any]) -> None:
        if self.webhook is not None:
            self.webhook.submit(report_id, report)

    async def user_state(self, user: str) -> dict[str, Any]:
        """One user as an operator sees it (``GET /admin/users/{user}``)."""
        now = time.time()
        admission = await self.safety.admit(user, now)
        where = await self.store.whereabouts(user)
        reports = await self.safety.reports(100, user=user)
        return {
            "user": user,
            "online": where.online,
            "instance": where.instance,
            "rooms": where.rooms,
            "match": where.peer,
            "reportsReceived": len(reports),
            "reports": reports[:10],
            "ban": None if admission.ban is None else admission.ban.to_json(),
            "blocked": await self.safety.blocked(user),
            "blockedBy": sorted(admission.blocked_by),
        }
