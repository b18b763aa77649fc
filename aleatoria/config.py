"""Server configuration: one frozen object, built from the environment and CLI flags.

Every setting has an environment variable (the original server's names are kept) and an
``aleatoria serve`` flag; flags win, and a variable set to the empty string counts as unset.
The table in ``SETTINGS`` is the single source for both, and for the docs.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote, urlsplit

import attrs

from aleatoria.ice import IcePolicy, policy_problem
from aleatoria.origin import host_entry, normalise
from aleatoria.search import SearchRules


class ConfigError(ValueError):
    """A setting has a value the server cannot use; the message names the setting."""


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise ValueError(f"expected a boolean (1/0, true/false), got {text!r}")


def _parse_origins(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _parse_list(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _parse_hosts(text: str) -> tuple[str, ...]:
    return tuple(part.strip().lower() for part in text.split(",") if part.strip())


def _parse_log_format(text: str) -> str:
    value = text.strip().lower()
    if value not in ("text", "json"):
        raise ValueError(f"expected text or json, got {text!r}")
    return value


@attrs.frozen
class Setting:
    """One configuration knob, defined once: its ``Config`` attribute, environment variable,
    parser and meaning; its flag (``--`` and the name with dashes unless given) and its
    default (the ``Config`` field's, shown as ``shown_default``). ``aleatoria serve --help``,
    the README's table and docs/operations.md's are all made from ``SETTINGS``, and
    docs/scaleout.md's from those marked ``scale_out`` (``scripts/settings_table.py`` writes
    the docs; a test fails when they drift)."""

    name: str
    env: str
    parse: Any
    help: str
    flag: str = attrs.field(
        default=attrs.Factory(lambda self: "--" + self.name.replace("_", "-"), takes_self=True)
    )
    # How to show the default, when the value alone would not say it (None, a computed set).
    default_text: str | None = None
    repeatable: bool = False  # the flag may be given again (values add up)
    scale_out: bool = False  # also listed in docs/scaleout.md's table (several instances)

    @property
    def default(self) -> Any:
        """The default value: the ``Config`` field's."""
        return attrs.fields_dict(Config)[self.name].default

    @property
    def switch(self) -> bool:
        """A flag without a value (on when given); its variable takes 1/0, true/false."""
        return bool(self.parse is _parse_bool)

    @property
    def shown_default(self) -> str:
        """The default as --help and the docs show it."""
        if self.default_text is not None:
            return self.default_text
        value = self.default
        if value is None:
            return "unset"
        if isinstance(value, bool):
            return "on" if value else "off"
        if isinstance(value, tuple):
            return ",".join(value) if value else "empty"
        if isinstance(value, float):
            return f"{value:g}"
        return str(value)


SETTINGS: tuple[Setting, ...] = (
    Setting("host", "ALEATORIA_HOST", str, "address to listen on"),
    Setting("port", "ALEATORIA_PORT", int, "TCP port (0 picks a free one and logs it)"),
    Setting(
        "allowed_origins",
        "ALEATORIA_ALLOWED_ORIGINS",
        _parse_origins,
        "comma list of browser origins allowed to connect (the flag may be repeated); * allows any",
        flag="--allowed-origin",
        default_text="empty = same-origin only",
        repeatable=True,
    ),
    Setting(
        "require_origin",
        "ALEATORIA_REQUIRE_ORIGIN",
        _parse_bool,
        "refuse WebSocket requests that carry no Origin header",
    ),
    Setting(
        "allowed_hosts",
        "ALEATORIA_ALLOWED_HOSTS",
        _parse_hosts,
        "comma list of Host names that count as this server for same-origin pages (stops DNS "
        "rebinding); * = any; behind a proxy list its public host",
        default_text="localhost,127.0.0.1,[::1] and the listen address",
    ),
    Setting("log_level", "ALEATORIA_LOG_LEVEL", str, "debug, info, warning or error"),
    Setting(
        "log_format",
        "ALEATORIA_LOG_FORMAT",
        _parse_log_format,
        "text (key=value) or json, one line per event on stderr",
    ),
    Setting(
        "redis_url",
        "ALEATORIA_REDIS_URL",
        str,
        "redis:// or rediss:// URL (overrides VALKEY_*), or redis+cluster:// / rediss+cluster:// for a "
        "Redis Cluster (any node: the others are discovered)",
        scale_out=True,
    ),
    Setting("valkey_host", "VALKEY_HOST", str, "Redis/Valkey host (setting it turns the Redis store on)"),
    Setting("valkey_port", "VALKEY_PORT", int, "Redis/Valkey port"),
    Setting("valkey_username", "VALKEY_USERNAME", str, "Redis/Valkey ACL user name"),
    Setting("valkey_password", "VALKEY_PASSWORD", str, "Redis/Valkey password"),
    Setting("valkey_use_tls", "VALKEY_USE_TLS", _parse_bool, "connect to Redis/Valkey over TLS"),
    Setting("redis_db", "REDIS_DB", int, "Redis database number"),
    Setting(
        "message_ttl_hours",
        "MESSAGE_TTL_HOURS",
        float,
        "history retention in hours (decimals allowed; at most 876000)",
    ),
    Setting(
        "history_max",
        "ALEATORIA_HISTORY_MAX",
        int,
        "messages kept per room and per DM conversation (at most 1000000)",
    ),
    Setting(
        "auth_secret",
        "ALEATORIA_AUTH_SECRET",
        str,
        "HS256 secret (32 bytes or more); when set, /ws requires a JWT; unset: userIds are trusted",
    ),
    Setting(
        "max_connections",
        "ALEATORIA_MAX_CONNECTIONS",
        int,
        "sockets at once, counted from accept (then 503; /health still answers)",
    ),
    Setting(
        "max_connections_per_ip",
        "ALEATORIA_MAX_CONNECTIONS_PER_IP",
        int,
        "sockets per client IP, counted from accept (0 = no limit; behind a proxy set "
        "--client-ip-header: then WebSocket sessions per forwarded address)",
    ),
    Setting(
        "client_ip_header",
        "ALEATORIA_CLIENT_IP_HEADER",
        str,
        "header carrying the client IP, set by your reverse proxy (e.g. X-Real-IP)",
    ),
    Setting(
        "handshake_timeout",
        "ALEATORIA_HANDSHAKE_TIMEOUT",
        float,
        "seconds a client has to send its request head",
    ),
    Setting("ping_interval", "ALEATORIA_PING_INTERVAL", float, "seconds between WebSocket pings"),
    Setting(
        "idle_timeout",
        "ALEATORIA_IDLE_TIMEOUT",
        float,
        "seconds without traffic before a connection is closed",
    ),
    Setting(
        "outbox_frames",
        "ALEATORIA_OUTBOX_FRAMES",
        int,
        "frames queued for a slow client before it is closed with 1013",
    ),
    Setting(
        "resume_window",
        "ALEATORIA_RESUME_WINDOW",
        float,
        "seconds a dropped level-2 session is kept for its client to resume (0 = never kept)",
    ),
    Setting(
        "room_linger",
        "ALEATORIA_ROOM_LINGER",
        float,
        "seconds a busy room's next message waits for others, so members get them in one send "
        "(a lone message never waits; 0 = off; at most 0.1)",
    ),
    Setting(
        "max_frame_bytes",
        "ALEATORIA_MAX_FRAME_BYTES",
        int,
        "largest message a client may send (larger: close 1009)",
    ),
    Setting(
        "rate_limit",
        "ALEATORIA_RATE_LIMIT",
        float,
        "messages/s per connection (0 = no limit; over it: error rate_limited)",
    ),
    Setting("rate_burst", "ALEATORIA_RATE_BURST", int, "burst allowance of the rate limit"),
    Setting(
        "frame_rate",
        "ALEATORIA_FRAME_RATE",
        float,
        "control frames and fragments/s per connection (over it: close 1008; 0 = off)",
    ),
    Setting("frame_burst", "ALEATORIA_FRAME_BURST", int, "burst allowance of the frame budget"),
    Setting(
        "outbox_bytes",
        "ALEATORIA_OUTBOX_BYTES",
        int,
        "bytes queued for a slow client (behind the frame being written) before it is closed with 1013;"
        " also the most a history reply holds (fewer messages than its limit; page on for more), and about"
        " the most a report reads of the reporter's rooms for its evidence",
    ),
    Setting(
        "history_memory_mb",
        "ALEATORIA_HISTORY_MEMORY_MB",
        float,
        "MiB of history kept in the server's memory; the least recently written conversations go first",
    ),
    Setting(
        "max_rooms_per_user",
        "ALEATORIA_MAX_ROOMS_PER_USER",
        int,
        "rooms one user may be in at once (more: error limit_reached)",
    ),
    Setting(
        "max_rooms",
        "ALEATORIA_MAX_ROOMS",
        int,
        "rooms with members on this instance at once (a new one beyond: error limit_reached; "
        "about 5 KB each)",
    ),
    Setting(
        "new_dm_per_hour",
        "ALEATORIA_NEW_DM_PER_HOUR",
        int,
        "new DM partners a user may write to per hour, across its connections (more: error limit_reached)",
    ),
    Setting(
        "max_payload_bytes",
        "ALEATORIA_MAX_PAYLOAD_BYTES",
        int,
        "largest chat payload, as UTF-8 JSON with every field counted (more: error too_large)",
    ),
    Setting(
        "redis_connect_timeout",
        "ALEATORIA_REDIS_CONNECT_TIMEOUT",
        float,
        "seconds to wait for a Redis connection before degrading (at most 3600)",
    ),
    Setting(
        "redis_call_timeout",
        "ALEATORIA_REDIS_CALL_TIMEOUT",
        float,
        "seconds to wait for a Redis reply before degrading (at most 3600)",
    ),
    Setting(
        "redis_write_buffer",
        "ALEATORIA_REDIS_WRITE_BUFFER",
        int,
        "history writes buffered for Redis (oldest dropped beyond this)",
    ),
    Setting(
        "redis_cluster",
        "ALEATORIA_REDIS_CLUSTER",
        _parse_bool,
        "the Redis URL (or VALKEY_HOST) names a Redis Cluster node (same as a redis+cluster:// URL)",
        scale_out=True,
    ),
    Setting(
        "ice_urls",
        "ALEATORIA_ICE_URLS",
        _parse_list,
        "comma list of stun:, turn: and turns: URLs handed to browsers for calls (docs/turn.md)",
    ),
    Setting(
        "turn_secret",
        "ALEATORIA_TURN_SECRET",
        _parse_list,
        "the TURN server's shared secret (coturn static-auth-secret); comma list to rotate, the first signs",
    ),
    Setting("turn_ttl", "ALEATORIA_TURN_TTL", int, "seconds a TURN credential stays valid (60..604800)"),
    Setting(
        "relay_only",
        "ALEATORIA_RELAY_ONLY",
        _parse_bool,
        "privacy mode: calls only through TURN, and the server relays no candidate but relay ones",
    ),
    Setting(
        "workers",
        "ALEATORIA_WORKERS",
        int,
        "worker processes sharing the port (SO_REUSEPORT), restarted if they die; more than 1 needs Redis; "
        "at most 256",
        scale_out=True,
    ),
    Setting(
        "metrics_port",
        "ALEATORIA_METRICS_PORT",
        int,
        "port for /health and /metrics (with --workers: the parent answers for every worker; "
        "0 picks a free one; unset = only on the main port)",
        scale_out=True,
    ),
    Setting(
        "presence_ttl",
        "ALEATORIA_PRESENCE_TTL",
        float,
        "seconds after its last heartbeat an instance counts as dead (its users leave pool and presence)",
        scale_out=True,
    ),
    Setting(
        "heartbeat_interval",
        "ALEATORIA_HEARTBEAT_INTERVAL",
        float,
        "seconds between an instance's heartbeats and its checks for dead instances (at most half "
        "the presence TTL)",
        scale_out=True,
    ),
    # Safety (PROTOCOL.md section 13).
    Setting(
        "match_rate",
        "ALEATORIA_MATCH_RATE",
        float,
        "request_random_peer per second per user (over it: rate_limited; 0 = no limit)",
    ),
    Setting("match_burst", "ALEATORIA_MATCH_BURST", int, "burst allowance of the peer-request limit"),
    Setting(
        "admin_token",
        "ALEATORIA_ADMIN_TOKEN",
        str,
        "Bearer token of the operator API under /admin (unset: /admin is 404); also signs webhooks",
    ),
    Setting(
        "report_webhook",
        "ALEATORIA_REPORT_WEBHOOK",
        str,
        "http(s) URL each report is POSTed to as JSON, signed with HMAC-SHA256 (X-Aleatoria-Signature)",
    ),
    Setting(
        "auto_shadow_reports",
        "ALEATORIA_AUTO_SHADOW_REPORTS",
        int,
        "shadow-ban for a day a user reported by this many distinct users within an hour (0 = off)",
    ),
    Setting("report_cap", "ALEATORIA_REPORT_CAP", int, "reports kept (the oldest are dropped)"),
    Setting(
        "reports_per_hour",
        "ALEATORIA_REPORTS_PER_HOUR",
        int,
        "reports a user may file in an hour from its first, across its connections (more: error "
        "limit_reached, nothing stored; 0 = no limit)",
    ),
    # Matching (PROTOCOL.md section 12).
    Setting(
        "search_timeout",
        "ALEATORIA_SEARCH_TIMEOUT",
        float,
        "seconds a searcher (request_random_peer with wait) waits before no_peer_available",
    ),
    Setting(
        "interest_wait",
        "ALEATORIA_INTEREST_WAIT",
        float,
        "seconds a searcher with interests is matched only on a common interest (then anyone)",
    ),
    Setting(
        "rematch_cooldown",
        "ALEATORIA_REMATCH_COOLDOWN",
        float,
        "seconds during which two former partners are not matched again through the search queue "
        "(at most 31536000, a year)",
    ),
    Setting(
        "search_tick",
        "ALEATORIA_SEARCH_TICK",
        float,
        "Redis mode: seconds between each instance's look at the search queue (fallbacks, timeouts)",
    ),
    Setting(
        "announce_retry",
        "ALEATORIA_ANNOUNCE_RETRY",
        float,
        "Redis mode: seconds the search queue keeps trying to tell a user on another instance "
        "of its match or timeout while the bus cannot carry it (a stall, a failover)",
    ),
    Setting(
        "webhook_queue",
        "ALEATORIA_WEBHOOK_QUEUE",
        int,
        "reports waiting for the webhook (beyond it the oldest waiting is dropped and counted)",
    ),
    Setting(
        "shutdown_timeout",
        "ALEATORIA_SHUTDOWN_TIMEOUT",
        float,
        "seconds a graceful stop may take (1001 to clients, history flushed); a --workers "
        "worker still running 5 s later is killed",
    ),
    Setting(
        "sentry_dsn",
        "SENTRY_DSN",
        str,
        "report errors to Sentry (needs pip install 'aleatoria[sentry]')",
    ),
)

# The largest values that still work (see Config.validate).
MAX_MESSAGE_TTL_HOURS = 876_000  # 100 years
MAX_HISTORY = 1_000_000
MAX_REMATCH_COOLDOWN = 31_536_000  # a year, in seconds
MAX_WORKERS = 256

# Config fields that are not settings: the protocol's own limits (PROTOCOL.md sections 3, 4
# and 5), the same for every deployment.
FIXED = frozenset(
    {"max_id_chars", "max_content_chars", "max_message_id_chars", "close_timeout", "rate_abuse_seconds"}
)


@attrs.frozen(kw_only=True)
class Config:
    """Everything the server needs to know, fixed at start-up."""

    host: str = "127.0.0.1"
    port: int = 8085
    allowed_origins: tuple[str, ...] = ()
    require_origin: bool = False
    # Host names that count as this server for the same-origin rule (PROTOCOL.md s16); None:
    # localhost, 127.0.0.1, [::1] and the listen address unless it is a wildcard.
    allowed_hosts: tuple[str, ...] | None = None
    log_level: str = "info"
    log_format: str = "text"

    redis_url: str | None = None
    valkey_host: str | None = None
    valkey_port: int = 6379
    valkey_username: str | None = None
    valkey_password: str | None = attrs.field(default=None, repr=False)
    valkey_use_tls: bool = False
    redis_db: int = 0
    redis_connect_timeout: float = 2.0
    redis_call_timeout: float = 2.0

    message_ttl_hours: float = 24.0
    history_max: int = 1000
    auth_secret: str | None = attrs.field(default=None, repr=False)
    max_connections: int = 20_000
    max_connections_per_ip: int = 1000
    client_ip_header: str | None = None

    # Connection behaviour (PROTOCOL.md section 5).
    ping_interval: float = 25.0
    idle_timeout: float = 60.0
    outbox_frames: int = 256
    resume_window: float = 30.0  # PROTOCOL.md section 15
    room_linger: float = 0.001
    handshake_timeout: float = 10.0
    close_timeout: float = 3.0
    shutdown_timeout: float = 10.0

    # Limits (PROTOCOL.md sections 3 and 4).
    max_frame_bytes: int = 64 * 1024
    max_id_chars: int = 64
    max_content_chars: int = 4000
    max_message_id_chars: int = 128
    rate_limit: float = 30.0
    rate_burst: int = 60
    rate_abuse_seconds: float = 10.0

    # Holding up against hostile clients (PROTOCOL.md section 16).
    frame_rate: float = 200.0
    frame_burst: int = 400
    outbox_bytes: int = 1024 * 1024
    history_memory_mb: float = 256.0
    max_rooms_per_user: int = 100
    # PROTOCOL.md section 16: every count that grows has its bound. One address may hold
    # max_connections_per_ip x max_rooms_per_user rooms (100,000 at the defaults, ~530 MB).
    max_rooms: int = 100_000
    new_dm_per_hour: int = 200
    max_payload_bytes: int = 32_768

    # Redis store (PROTOCOL.md section 6): history writes queued while Redis is slow or down.
    redis_write_buffer: int = 10_000
    redis_cluster: bool = False

    # ICE servers and IP privacy (PROTOCOL.md section 14; docs/turn.md).
    ice_urls: tuple[str, ...] = ()
    turn_secret: tuple[str, ...] = attrs.field(default=(), repr=False)
    turn_ttl: int = 3600
    relay_only: bool = False

    # Scale-out (PROTOCOL.md section 9). An instance whose heartbeat is older than
    # ``presence_ttl`` is dead: its users leave pool and presence at the next check, so
    # within presence_ttl + heartbeat_interval (13 s by default).
    workers: int = 1
    # /health and /metrics on a port of their own (with --workers: the whole tree, merged).
    metrics_port: int | None = None
    sentry_dsn: str | None = None
    presence_ttl: float = 10.0
    heartbeat_interval: float = 3.0

    # Safety (PROTOCOL.md section 13).
    match_rate: float = 2.0
    match_burst: int = 30
    admin_token: str | None = attrs.field(default=None, repr=False)
    report_webhook: str | None = None
    auto_shadow_reports: int = 0
    report_cap: int = 10_000
    reports_per_hour: int = 30
    webhook_queue: int = 1000

    # Matching (PROTOCOL.md section 12).
    search_timeout: float = 120.0
    interest_wait: float = 10.0
    rematch_cooldown: float = 300.0
    search_tick: float = 0.5
    announce_retry: float = 30.0

    @property
    def message_ttl_seconds(self) -> float:
        return self.message_ttl_hours * 3600.0

    @property
    def history_memory_bytes(self) -> int:
        return int(self.history_memory_mb * 1024 * 1024)

    @property
    def search_rules(self) -> SearchRules:
        return SearchRules(self.search_timeout, self.interest_wait, self.rematch_cooldown)

    @property
    def ice(self) -> IcePolicy:
        """What the server tells clients about ICE servers and privacy mode."""
        return IcePolicy(self.ice_urls, self.turn_secret, self.turn_ttl, self.relay_only)

    @property
    def effective_allowed_hosts(self) -> tuple[str, ...]:
        """Host names (lower case, IPv6 in brackets) the same-origin rule trusts."""
        if self.allowed_hosts is not None:
            return self.allowed_hosts
        hosts = ["localhost", "127.0.0.1", "[::1]"]
        listen = self.host.lower()
        if listen not in ("", "0.0.0.0", "::", "[::]"):
            hosts.append(f"[{listen}]" if ":" in listen and not listen.startswith("[") else listen)
        return tuple(dict.fromkeys(hosts))

    @property
    def effective_redis_url(self) -> str | None:
        """The Redis URL to use, or None for the in-memory store. A ``redis+cluster://``
        (``rediss+cluster://``) URL is returned as is: see ``uses_redis_cluster``."""
        if self.redis_url:
            return self.redis_url
        if not self.valkey_host:
            return None
        scheme = "rediss" if self.valkey_use_tls else "redis"
        auth = ""
        if self.valkey_username or self.valkey_password:
            auth = quote(self.valkey_username or "", safe="")
            if self.valkey_password:
                auth += ":" + quote(self.valkey_password, safe="")
            auth += "@"
        host = self.valkey_host
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"  # an IPv6 address
        return f"{scheme}://{auth}{host}:{self.valkey_port}/{self.redis_db}"

    @property
    def uses_redis_cluster(self) -> bool:
        """True when Redis is a Redis Cluster (``--redis-cluster`` or a ``+cluster`` URL)."""
        url = self.effective_redis_url or ""
        return bool(url) and (self.redis_cluster or url.split("://", 1)[0].endswith("+cluster"))

    def validate(self) -> Config:
        """Raise ConfigError for values that cannot work; return self for chaining."""
        # float() takes "nan" and "inf", and every range check below is False for NaN: without
        # this, ALEATORIA_PING_INTERVAL=nan was a traceback just after start-up and
        # ALEATORIA_SHUTDOWN_TIMEOUT=nan a stop that never ended.
        for setting in SETTINGS:
            value = getattr(self, setting.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{setting.env} must be a finite number, got {value}")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"ALEATORIA_PORT must be 0..65535, got {self.port}")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ConfigError(f"ALEATORIA_METRICS_PORT must be 0..65535, got {self.metrics_port}")
        if self.metrics_port and self.metrics_port == self.port:
            raise ConfigError("ALEATORIA_METRICS_PORT must differ from ALEATORIA_PORT")
        if self.message_ttl_hours <= 0:
            raise ConfigError("MESSAGE_TTL_HOURS must be positive")
        # Upper bounds where a larger value broke the server rather than meaning "a lot": the
        # TTL in nanoseconds overflowed int() (1e300), a history cap past 64 bits was a
        # traceback at every message (a deque's maxlen; Redis refused it and the fallback died),
        # a Redis timeout past the socket's time_t a reconnect loop of tracebacks, a cooldown
        # past Redis's PEXPIRE range a degraded store at every match.
        if self.message_ttl_hours > MAX_MESSAGE_TTL_HOURS:
            raise ConfigError(f"MESSAGE_TTL_HOURS must be at most {MAX_MESSAGE_TTL_HOURS} (100 years)")
        if self.history_max < 1:
            raise ConfigError("ALEATORIA_HISTORY_MAX must be at least 1")
        if self.history_max > MAX_HISTORY:
            raise ConfigError(f"ALEATORIA_HISTORY_MAX must be at most {MAX_HISTORY}")
        if self.ping_interval <= 0 or self.idle_timeout <= 0:
            raise ConfigError("ALEATORIA_PING_INTERVAL and ALEATORIA_IDLE_TIMEOUT must be positive")
        # A quiet client's only traffic is its pongs: with the idle timeout at or under the
        # ping interval every open tab that sent nothing was closed (1001 idle timeout), e.g.
        # ALEATORIA_IDLE_TIMEOUT=20 set to stay under a proxy's 30 s, with pings every 25 s.
        if self.idle_timeout <= self.ping_interval:
            raise ConfigError(
                f"ALEATORIA_IDLE_TIMEOUT ({self.idle_timeout:g} s) must be longer than "
                f"ALEATORIA_PING_INTERVAL ({self.ping_interval:g} s): a client that only answers "
                "pings would be closed as idle"
            )
        if self.handshake_timeout <= 0:
            raise ConfigError("ALEATORIA_HANDSHAKE_TIMEOUT must be positive (clients would hang)")
        if self.max_connections < 1:
            raise ConfigError("ALEATORIA_MAX_CONNECTIONS must be at least 1")
        if self.max_connections_per_ip < 0:
            raise ConfigError("ALEATORIA_MAX_CONNECTIONS_PER_IP must be 0 (no limit) or more")
        # Looked up in every upgrade: a name with a non-latin-1 character was a traceback per
        # request, one with a space (or any non-token character) matched nothing, so every
        # client counted as the proxy's address against the per-address cap.
        if self.client_ip_header and not _HEADER_NAME.fullmatch(self.client_ip_header):
            raise ConfigError(
                "ALEATORIA_CLIENT_IP_HEADER must be an HTTP header name such as X-Real-IP, "
                f"got {self.client_ip_header!r}"
            )
        if self.outbox_frames < 1:
            raise ConfigError("ALEATORIA_OUTBOX_FRAMES must be at least 1")
        if not 0 <= self.resume_window <= 3600:
            raise ConfigError("ALEATORIA_RESUME_WINDOW must be 0..3600 seconds")
        if not 0 <= self.room_linger <= 0.1:
            raise ConfigError("ALEATORIA_ROOM_LINGER must be 0..0.1 seconds (it delays busy rooms)")
        if self.max_frame_bytes < 1024:
            raise ConfigError("ALEATORIA_MAX_FRAME_BYTES must be at least 1024")
        if self.rate_limit < 0 or self.rate_burst < 1:
            raise ConfigError("ALEATORIA_RATE_LIMIT must be >= 0 and ALEATORIA_RATE_BURST >= 1")
        if self.frame_rate < 0 or self.frame_burst < 1:
            raise ConfigError("ALEATORIA_FRAME_RATE must be >= 0 and ALEATORIA_FRAME_BURST >= 1")
        if self.outbox_bytes < 64 * 1024:
            raise ConfigError("ALEATORIA_OUTBOX_BYTES must be at least 65536 (one largest frame)")
        if self.history_memory_mb <= 0:
            raise ConfigError("ALEATORIA_HISTORY_MEMORY_MB must be positive")
        if self.match_rate < 0 or self.match_burst < 1:
            raise ConfigError("ALEATORIA_MATCH_RATE must be >= 0 and ALEATORIA_MATCH_BURST >= 1")
        if self.search_timeout <= 0 or self.interest_wait < 0 or self.rematch_cooldown < 0:
            raise ConfigError(
                "ALEATORIA_SEARCH_TIMEOUT must be positive, ALEATORIA_INTEREST_WAIT and "
                "ALEATORIA_REMATCH_COOLDOWN 0 or more"
            )
        if self.rematch_cooldown > MAX_REMATCH_COOLDOWN:
            raise ConfigError(
                f"ALEATORIA_REMATCH_COOLDOWN must be at most {MAX_REMATCH_COOLDOWN} seconds (a year)"
            )
        if not 0.01 <= self.search_tick <= 10:
            raise ConfigError("ALEATORIA_SEARCH_TICK must be 0.01..10 seconds")
        if not 0 <= self.announce_retry <= 3600:
            raise ConfigError("ALEATORIA_ANNOUNCE_RETRY must be 0..3600 seconds")
        if self.auto_shadow_reports < 0:
            raise ConfigError("ALEATORIA_AUTO_SHADOW_REPORTS must be >= 0")
        if self.reports_per_hour < 0:
            raise ConfigError("ALEATORIA_REPORTS_PER_HOUR must be >= 0")
        if self.report_cap < 1 or self.webhook_queue < 1:
            raise ConfigError("ALEATORIA_REPORT_CAP and ALEATORIA_WEBHOOK_QUEUE must be at least 1")
        if self.report_webhook and not self.report_webhook.startswith(("http://", "https://")):
            raise ConfigError("ALEATORIA_REPORT_WEBHOOK must be an http:// or https:// URL")
        webhook_problem = self.report_webhook and webhook_url_problem(self.report_webhook)
        if webhook_problem:
            # The URL is not shown: a webhook's path or query often carries its secret.
            raise ConfigError(f"ALEATORIA_REPORT_WEBHOOK is not usable: {webhook_problem}")
        # The token travels in an Authorization header, read as latin-1 and compared as UTF-8:
        # one with a non-ASCII character (or a blank at either end, stripped from the header)
        # was taken but no request could ever match it. Its value is a secret: not shown.
        if self.admin_token and not _HEADER_TOKEN.fullmatch(self.admin_token):
            raise ConfigError(
                "ALEATORIA_ADMIN_TOKEN must be printable ASCII with no blank at either end "
                "(it is sent in an HTTP header)"
            )
        if self.report_webhook and not self.admin_token:
            raise ConfigError("ALEATORIA_REPORT_WEBHOOK needs ALEATORIA_ADMIN_TOKEN (it signs the reports)")
        if self.max_rooms < 1:
            raise ConfigError("ALEATORIA_MAX_ROOMS must be at least 1")
        if self.max_rooms_per_user < 1 or self.new_dm_per_hour < 1:
            raise ConfigError("ALEATORIA_MAX_ROOMS_PER_USER and ALEATORIA_NEW_DM_PER_HOUR must be at least 1")
        if self.max_payload_bytes < 1024:
            raise ConfigError("ALEATORIA_MAX_PAYLOAD_BYTES must be at least 1024")
        if self.log_level.lower() not in {"debug", "info", "warning", "error"}:
            raise ConfigError(
                f"ALEATORIA_LOG_LEVEL must be debug, info, warning or error, got {self.log_level!r}"
            )
        if self.log_format not in ("text", "json"):
            raise ConfigError(f"ALEATORIA_LOG_FORMAT must be text or json, got {self.log_format!r}")
        if self.shutdown_timeout < 2:
            raise ConfigError("ALEATORIA_SHUTDOWN_TIMEOUT must be at least 2 seconds")
        if self.redis_connect_timeout <= 0 or self.redis_call_timeout <= 0:
            raise ConfigError(
                "ALEATORIA_REDIS_CONNECT_TIMEOUT and ALEATORIA_REDIS_CALL_TIMEOUT must be positive"
            )
        if max(self.redis_connect_timeout, self.redis_call_timeout) > 3600:
            raise ConfigError(
                "ALEATORIA_REDIS_CONNECT_TIMEOUT and ALEATORIA_REDIS_CALL_TIMEOUT must be at most "
                "3600 seconds"
            )
        if self.redis_write_buffer < 1:
            raise ConfigError("ALEATORIA_REDIS_WRITE_BUFFER must be at least 1")
        if self.workers < 1:
            raise ConfigError("ALEATORIA_WORKERS must be at least 1")
        # One per core is the advice (docs/scaleout.md); without a bound a typo (40000 for 4)
        # started processes until the machine ran out of memory.
        if self.workers > MAX_WORKERS:
            raise ConfigError(f"ALEATORIA_WORKERS must be at most {MAX_WORKERS} (one per core is enough)")
        if self.workers > 1 and not self.effective_redis_url:
            raise ConfigError(
                f"--workers {self.workers} needs Redis (set ALEATORIA_REDIS_URL or VALKEY_HOST): "
                "without a shared Redis every worker would be a separate server"
            )
        if self.heartbeat_interval <= 0 or self.presence_ttl < 2 * self.heartbeat_interval:
            raise ConfigError(
                "ALEATORIA_HEARTBEAT_INTERVAL must be positive and ALEATORIA_PRESENCE_TTL at "
                "least twice as long"
            )
        # Entries the Origin check cannot use were dropped silently: with
        # ALEATORIA_ALLOWED_ORIGINS=chat.example.com (no scheme) every page of that site got
        # 403 "Origin not allowed", and a URL in ALEATORIA_ALLOWED_HOSTS matched no Host.
        for origin in self.allowed_origins:
            if origin != "*" and normalise(origin) is None:
                raise ConfigError(
                    f"ALEATORIA_ALLOWED_ORIGINS: {origin!r} is not an origin; give it as browsers send "
                    "it, scheme and host, e.g. https://chat.example.com"
                )
        for entry in self.allowed_hosts or ():
            if entry != "*" and host_entry(entry) is None:
                raise ConfigError(
                    f"ALEATORIA_ALLOWED_HOSTS: {entry!r} is not a host name; give the name alone "
                    "(chat.example.com) or name:port, without a scheme or path"
                )
        ice_problem = policy_problem(self.ice)
        if ice_problem:
            raise ConfigError(ice_problem)
        # A URL in VALKEY_HOST was bracketed as if it were an IPv6 address, and the error
        # read "Invalid IPv6 URL" about 'redis://[redis://127.0.0.1]:6379/0'.
        if not self.redis_url and self.valkey_host and "/" in self.valkey_host:
            raise ConfigError(
                f"VALKEY_HOST must be a host name or address, got {redacted_url(self.valkey_host)!r} "
                "(for a URL, set ALEATORIA_REDIS_URL)"
            )
        url = self.effective_redis_url
        if url:
            problem = redis_url_problem(url, cluster=self.uses_redis_cluster)
            if problem:
                shown = repr(redacted_url(url))
                if self.redis_url:
                    where = f"ALEATORIA_REDIS_URL (--redis-url) {shown}"
                else:
                    where = f"the Redis URL made from VALKEY_HOST and VALKEY_PORT, {shown},"
                raise ConfigError(f"{where} is not usable: {problem}")
        return self


_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110's token
_HEADER_TOKEN = re.compile(r"[!-~]([ -~]*[!-~])?")  # printable ASCII, no blank at either end
_REDIS_SCHEMES = ("redis", "rediss", "unix")
_DB_PATH = re.compile(r"(/\d*)?")  # redis-py reads the path as the database number


def redis_url_problem(url: str, *, cluster: bool) -> str | None:
    """Why the server could not use ``url`` for Redis, or None if it can.

    redis-py judges it first, since redis-py is what reads it at run time (the two cannot
    disagree): ``parse_url`` refuses a wrong scheme, a port that is not a number or is out
    of range, an unclosed ``[`` and a query option of the wrong type; building one
    connection object (unconnected) refuses unknown query options, which would otherwise
    raise TypeError at the first connect, on a worker thread. Then what redis-py lets
    through but would fail later, inside a running server: a path that is not a database
    number (redis-py silently takes database 0 for ``/abc``), a negative database, a
    ``unix://`` URL without a path and, on a Redis Cluster, a unix socket or a database
    other than 0.
    """
    # Imported here: the in-memory mode never loads redis-py (nor does the protocol core).
    from redis.connection import ConnectionPool
    from redis.exceptions import RedisError

    scheme, sep, rest = url.partition("://")
    base = scheme.removesuffix("+cluster")
    tagged = base != scheme
    if not sep or base not in _REDIS_SCHEMES or (tagged and base == "unix"):
        return "the scheme must be redis://, rediss://, unix://, redis+cluster:// or rediss+cluster://"
    plain = f"{base}://{rest}"
    try:
        pool = ConnectionPool.from_url(plain)
        pool.connection_class(**pool.connection_kwargs)
    except TypeError as exc:  # an option the connection does not take, or of the wrong kind
        return f"redis-py refuses its query options: {exc}"
    except (ValueError, RedisError) as exc:
        return str(exc) or type(exc).__name__
    options = pool.connection_kwargs
    db = options.get("db", 0)
    if base == "unix":
        if not options.get("path"):
            return "a unix:// URL needs the socket's path, e.g. unix:///run/redis/redis.sock"
        if cluster or tagged:
            return "a Redis Cluster is reached over TCP, not through a unix socket"
    elif not _DB_PATH.fullmatch(path := urlsplit(plain).path):
        return f"the path must be a database number such as /0, got {path!r}"
    if db < 0:
        return f"the database number must be 0 or more, got {db}"
    if (cluster or tagged) and db != 0:
        return f"a Redis Cluster has only database 0, got {db}"
    return None


def webhook_url_problem(url: str) -> str | None:
    """Why httpx, which posts the reports, could not use ``url``, or None if it can.

    Checked at start-up because the first report found out otherwise: ``https://[::1`` made
    httpx raise InvalidURL inside the webhook task, which took the whole server down, and
    ``http://`` (no host) failed every delivery with UnsupportedProtocol.
    """
    import httpx  # imported here, as redis-py above: only a server with a webhook needs it

    if any(char.isspace() for char in url):
        return "it contains a blank"
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        return str(exc)
    if not parsed.host:
        return "it has no host"
    if parsed.port is not None and not 0 < parsed.port <= 65535:
        return f"port {parsed.port} is out of range 1-65535"
    return None


def redacted_url(url: str) -> str:
    """``url`` with its password (user info, or a ``password=`` query option) masked, for
    messages; works on URLs too malformed to parse."""
    url = re.sub(r"^([^:/?#]*://)[^/?#]*@", r"\1***@", url)
    return re.sub(r"([?&]password=)[^&#]*", r"\1***", url)


def from_environment(environ: Mapping[str, str] | None = None, **overrides: Any) -> Config:
    """Build a Config from environment variables, then apply non-None overrides (flags)."""
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for setting in SETTINGS:
        raw = env.get(setting.env, "")
        if raw == "":
            continue
        try:
            values[setting.name] = setting.parse(raw)
        except ValueError as exc:
            kind = {int: "an integer", float: "a number"}.get(setting.parse)
            if kind is None:  # our own parsers say what they expected
                raise ConfigError(f"{setting.env}: {exc}") from None
            raise ConfigError(f"{setting.env} must be {kind}, got {raw!r}") from None
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return Config(**values).validate()
    except TypeError as exc:
        raise ConfigError(str(exc)) from None
