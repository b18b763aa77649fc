"""What the user asked for: one frozen, picklable ``Options`` and its checks.

The checks are the tool's safety rails: a run is always bounded in time
(``duration``) and in connections (``max_connections``), and it only targets loopback
addresses unless ``allow_remote`` is set — this tool must never aim load at another
machine by accident. Host names other than ``localhost`` are not resolved (resolution
could say anything); they need ``--allow-remote``.
Pure code, no I/O.
"""

from __future__ import annotations

import ipaddress
import re
import secrets
from urllib.parse import urlsplit

import attrs

SCENARIOS = ("fanout", "dm", "match", "conns", "soak", "search")
MAX_DURATION = 24 * 3600.0
MAX_PROCESSES = 64
# User ids are ``lt<run id>-<kind>-<n>…``: the protocol allows 1–64 of [A-Za-z0-9_.@-].
_RUN_ID = re.compile(r"[A-Za-z0-9_.@-]{1,16}")
_LANGUAGE = re.compile(r"[a-z]{2}|any")
MAX_INTERESTS = 10  # PROTOCOL.md section 12


class OptionsError(ValueError):
    """The options cannot make a safe, bounded run; the message says which one."""


def new_run_id() -> str:
    # Short and made of protocol-legal characters: user ids are ``lt<run>-...``.
    return secrets.token_hex(3)


@attrs.frozen(kw_only=True)
class Options:
    """Every knob of a run; see docs/loadtest.md for what each one means."""

    scenario: str
    url: str = "ws://127.0.0.1:8085"
    duration: float = 10.0
    processes: int = 1
    run_id: str = attrs.field(factory=new_run_id)

    # fanout (and the room part of soak)
    rooms: int = 4
    members: int = 10
    senders: int = 1
    window: int = 8
    rate: float = 0.0  # total room messages per second; 0 = as fast as the window allows
    size: int = 64

    # dm (and soak)
    pairs: int = 10
    dm_window: int = 1
    dm_rate: float = 0.0  # total pings per second; 0 = as fast as the window allows

    # match (and soak)
    users: int = 20
    match_pause: float = 0.0
    match_timeout: float = 5.0

    # search (also uses users, match_pause as the talk time, match_timeout)
    vocabulary: int = 50  # distinct interests, t0 the most popular
    interests_per_user: int = 3
    zipf: float = 1.0  # tag i is drawn with weight 1 / (i + 1) ** zipf
    languages: str = ""  # comma list of ISO 639-1 codes and "any"; each user gets one
    interest_wait: float = 10.0  # the server's ALEATORIA_INTEREST_WAIT (for the fairness check)
    cooldown: float = 300.0  # the server's ALEATORIA_REMATCH_COOLDOWN
    fairness_slack: float = 1.0  # seconds of timing doubt the checks allow (see docs)

    # conns
    connections: int = 100

    # every scenario
    connect_timeout: float = 10.0
    connect_concurrency: int = 100
    drain_timeout: float = 5.0
    inflight_timeout: float = 5.0
    max_connections: int = 20_000
    allow_remote: bool = False
    insecure: bool = False
    server_pid: int | None = None
    # Protocol level of every connection (2: ``v=2``, PROTOCOL.md section 11: welcome,
    # member_joined/member_left; the scenarios skip what they do not use).
    level: int = 1

    def connection_count(self) -> int:
        """How many WebSocket connections the run opens in total."""
        match self.scenario:
            case "fanout":
                return self.rooms * self.members
            case "dm":
                return 2 * self.pairs
            case "match" | "search":
                return self.users
            case "conns":
                return self.connections
            case "soak":
                return self.rooms * self.members + 2 * self.pairs + self.users
            case _:
                return 0

    def units(self) -> int:
        """How many independent units (rooms, pairs, users…) can be spread over workers."""
        match self.scenario:
            case "fanout":
                return self.rooms
            case "dm":
                return self.pairs
            case "match" | "search":
                return self.users
            case "conns":
                return self.connections
            case _:
                return max(self.rooms, self.pairs, self.users, 1)

    def language_choices(self) -> list[str | None]:
        """The languages users are given (None: "any"); empty when none are."""
        names = [part.strip() for part in self.languages.split(",") if part.strip()]
        return [None if name == "any" else name for name in names]

    def worker_count(self) -> int:
        """Processes actually used: never more than there are units to share out."""
        return max(1, min(self.processes, self.units()))


def is_loopback_host(host: str) -> bool:
    host = host.strip("[]").rstrip(".").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def validate(options: Options) -> Options:
    """Raise ``OptionsError`` unless the run is safe and bounded; return it for chaining."""
    if options.scenario not in SCENARIOS:
        raise OptionsError(f"unknown scenario {options.scenario!r}")
    parts = urlsplit(options.url)
    if parts.scheme not in {"ws", "wss"}:
        raise OptionsError(f"--url must be ws:// or wss://, got {options.url!r}")
    if not parts.hostname:
        raise OptionsError(f"--url has no host: {options.url!r}")
    try:
        parts.port  # noqa: B018 -- urlsplit checks the port only when asked for it
    except ValueError:
        raise OptionsError(f"--url has no valid port (0-65535): {options.url!r}") from None
    if parts.path not in {"", "/"} or parts.query:
        raise OptionsError("--url is the server's base URL; the tool adds /ws?userId=…")
    if not options.allow_remote and not is_loopback_host(parts.hostname):
        raise OptionsError(
            f"refusing to send load to {parts.hostname!r}: only loopback targets are allowed "
            "without --allow-remote"
        )
    if not _RUN_ID.fullmatch(options.run_id):
        raise OptionsError("--run-id must be 1-16 letters, digits or _.@- (it is part of user ids)")
    if not 0 < options.duration <= MAX_DURATION:
        raise OptionsError(f"--duration must be in (0, {MAX_DURATION:.0f}] seconds")
    if not 1 <= options.processes <= MAX_PROCESSES:
        raise OptionsError(f"--processes must be 1..{MAX_PROCESSES}")
    # The dm scenario's own flags for the pairs' window and rate are --window and --rate
    # (soak's are --dm-window and --dm-rate): name the flag the user typed.
    dm_flag = "--" if options.scenario == "dm" else "--dm-"
    counts = [
        ("--rooms", options.rooms),
        ("--members", options.members),
        ("--window", options.window),
        ("--pairs", options.pairs),
        (f"{dm_flag}window", options.dm_window),
        ("--users", options.users),
        ("--connections", options.connections),
        ("--connect-concurrency", options.connect_concurrency),
    ]
    for flag, value in counts:
        if value < 1:
            raise OptionsError(f"{flag} must be at least 1")
    if not 0 <= options.senders <= options.members:
        raise OptionsError("--senders must be between 0 and --members")
    if options.scenario in {"match", "search"} and options.users < 2:
        raise OptionsError(f"--users must be at least 2 for the {options.scenario} scenario")
    if options.vocabulary < 1:
        raise OptionsError("--vocabulary must be at least 1")
    if not 0 <= options.interests_per_user <= min(MAX_INTERESTS, options.vocabulary):
        raise OptionsError(f"--interests-per-user must be 0..{MAX_INTERESTS} and at most --vocabulary")
    for name in (part.strip() for part in options.languages.split(",") if part.strip()):
        if not _LANGUAGE.fullmatch(name):
            raise OptionsError(f"--languages: {name!r} is not a two-letter ISO 639-1 code or 'any'")
    if not 0 <= options.size <= 4000:
        raise OptionsError("--size must be 0..4000 characters (the protocol's content limit)")
    for flag, number in [
        ("--rate", options.rate),
        (f"{dm_flag}rate", options.dm_rate),
        ("--match-pause", options.match_pause),
        ("--zipf", options.zipf),
        ("--interest-wait", options.interest_wait),
        ("--cooldown", options.cooldown),
        ("--fairness-slack", options.fairness_slack),
    ]:
        if number < 0:
            raise OptionsError(f"{flag} must not be negative")
    for flag, number in {
        "--connect-timeout": options.connect_timeout,
        "--drain-timeout": options.drain_timeout,
        "--inflight-timeout": options.inflight_timeout,
        "--match-timeout": options.match_timeout,
    }.items():
        if number <= 0:
            raise OptionsError(f"{flag} must be positive")
    total = options.connection_count()
    if total > options.max_connections:
        raise OptionsError(
            f"the run would open {total} connections, more than --max-connections {options.max_connections}"
        )
    return options
