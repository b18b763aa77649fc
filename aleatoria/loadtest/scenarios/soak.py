"""``soak``: rooms, DM pairs and match users at once, at a steady rate, for a long time.

There is no soak-specific code: ``run_scenario`` runs the fanout, dm and match parts
side by side (see ``scenarios/__init__.py``). The CLI gives soak its own defaults — a
paced ``--rate``/``--dm-rate`` instead of "as fast as the window allows", a pause
between match cycles and a longer ``--duration`` — so the server sees a steady,
realistic mix rather than a flood. This module only holds those defaults.
"""

from __future__ import annotations

SOAK_DEFAULTS: dict[str, float | int] = {
    "duration": 60.0,
    "rooms": 2,
    "members": 5,
    "senders": 2,
    "rate": 50.0,
    "pairs": 5,
    "dm_rate": 20.0,
    "users": 10,
    "match_pause": 0.5,
}
