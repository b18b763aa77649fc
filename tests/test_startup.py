"""Start-up failures a user meets, each run as a real ``python -m aleatoria serve`` process:
a port in use or an address not on this machine end in one ``event=start_failed`` line and
exit status 1; a malformed Redis URL is refused before anything starts (exit status 2);
under ``--workers 2`` a worker that cannot start stops the parent with its reason and
status instead of being restarted forever."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import trio

from aleatoria.config import SETTINGS, Config, ConfigError, Setting, from_environment

pytestmark = pytest.mark.loopback  # subprocesses and busy ports

# A Redis URL for --workers (which needs one); these cases fail before Redis is used.
NO_REDIS = "redis://127.0.0.1:1/0"
# TEST-NET-1 (RFC 5737): documentation addresses, never assigned to a machine.
FOREIGN_ADDRESS = "192.0.2.1"
# How long a start-up failure may take to be reported, workers included (a worker takes
# about half a second to start; the parent gives up at its first failure).
REPORTED_WITHIN = 20.0


def _environment() -> dict[str, str]:
    """This environment without settings of the server (a developer's shell may set some)."""
    return {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("ALEATORIA_", "VALKEY_", "REDIS_", "MESSAGE_TTL"))
    }


async def _serve(*flags: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    """Run ``aleatoria serve FLAGS`` to its end; its exit status and its stderr."""
    command = [sys.executable, "-m", "aleatoria", "serve", *flags]
    with trio.fail_after(REPORTED_WITHIN):
        done = await trio.run_process(
            command,
            stdin=subprocess.DEVNULL,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env={**_environment(), **(env or {})},
        )
    return done.returncode, done.stderr.decode(errors="replace")


def _lines(text: str, marker: str) -> list[str]:
    return [line for line in text.splitlines() if marker in line]


@contextmanager
def _listening() -> Iterator[int]:
    """A port another program listens on (no SO_REUSEPORT, as most programs)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


async def test_a_busy_port_is_one_line_and_exit_1() -> None:
    """A port in use: exit status 1, exactly one ``event=start_failed`` line naming the
    reason and the address, and no traceback."""
    with _listening() as port:
        code, err = await _serve("--port", str(port))
    assert 1 == code, err
    failed = _lines(err, "event=start_failed")
    assert 1 == len(failed), err
    assert "reason=port_in_use" in failed[0]
    assert f"address=127.0.0.1:{port}" in failed[0]
    assert "Traceback" not in err
    assert "listening on" not in err


async def test_an_address_not_on_this_machine_is_exit_1() -> None:
    """``--host`` an address this machine does not have: exit 1, one start_failed line."""
    with socket.socket() as probe:
        try:
            probe.bind((FOREIGN_ADDRESS, 0))
        except OSError:
            pass
        else:  # pragma: no cover - net.ipv4.ip_nonlocal_bind=1 lets any address be bound
            pytest.skip("this machine lets a program bind addresses it does not have")
    code, err = await _serve("--host", FOREIGN_ADDRESS, "--port", "0")
    assert 1 == code, err
    failed = _lines(err, "event=start_failed")
    assert 1 == len(failed), err
    assert "reason=address_not_available" in failed[0]
    assert "Traceback" not in err


MALFORMED_URLS = [
    ("redis://127.0.0.1:notaport", "'notaport'"),
    ("http://127.0.0.1:6379", "the scheme must be redis://"),
    ("redis://:bad@[::1", "Invalid IPv6 URL"),
    ("redis://127.0.0.1:6379/abc", "the path must be a database number"),
    ("redis://127.0.0.1:6379/0?socket_timout=1", "'socket_timout'"),
    ("redis+cluster://127.0.0.1:7000/2", "a Redis Cluster has only database 0"),
]


@pytest.mark.parametrize(("url", "why"), MALFORMED_URLS)
async def test_a_malformed_redis_url_is_a_configuration_error(url: str, why: str) -> None:
    """A Redis URL redis-py cannot use is refused before anything starts: exit status 2, one
    message naming the setting and what is wrong, no traceback, no password shown."""
    code, err = await _serve("--redis-url", url, "--port", "0")
    assert 2 == code, err
    assert err.startswith("aleatoria: configuration error: ALEATORIA_REDIS_URL (--redis-url) "), err
    assert why in err
    assert 1 == len(err.splitlines()), err  # nothing else started, nothing else logged
    assert ":bad@" not in err


async def test_a_malformed_redis_url_from_the_environment_names_its_variable() -> None:
    """The same check for ALEATORIA_REDIS_URL and for the URL made from VALKEY_HOST."""
    code, err = await _serve("--port", "0", env={"ALEATORIA_REDIS_URL": "redis://127.0.0.1:notaport"})
    assert 2 == code, err
    assert "ALEATORIA_REDIS_URL" in err and "'notaport'" in err
    code, err = await _serve("--port", "0", env={"VALKEY_HOST": "bad[host"})
    assert 2 == code, err
    assert "made from VALKEY_HOST and VALKEY_PORT" in err
    assert "Traceback" not in err


def test_redis_urls_the_server_can_use_are_accepted() -> None:
    """Validation refuses nothing redis-py (and the cluster client) would use as meant."""
    for url in [
        "redis://127.0.0.1:6379/0",
        "redis://127.0.0.1",
        "rediss://user:p%40ss@redis.example.com:6380/2",
        "redis://[::1]:6379/1",
        "redis://127.0.0.1:6379/0?socket_keepalive=true&client_name=x",
        "unix:///run/redis/redis.sock?db=3",
        "redis+cluster://127.0.0.1:7000",
        "rediss+cluster://127.0.0.1:7000/0",
    ]:
        assert Config(redis_url=url).validate().redis_url == url
    with pytest.raises(ConfigError, match="unix socket"):
        Config(redis_url="unix:///run/redis/redis.sock", redis_cluster=True).validate()
    with pytest.raises(ConfigError, match="needs the socket's path"):
        Config(redis_url="unix://").validate()
    with pytest.raises(ConfigError, match="0 or more"):
        Config(redis_url="redis://127.0.0.1?db=-1").validate()


OUT_OF_RANGE = [
    ({"redis_connect_timeout": -1.0}, "ALEATORIA_REDIS_CONNECT_TIMEOUT"),
    ({"redis_connect_timeout": 0.0}, "ALEATORIA_REDIS_CONNECT_TIMEOUT"),
    ({"redis_call_timeout": -1.0}, "ALEATORIA_REDIS_CALL_TIMEOUT"),
    ({"redis_call_timeout": 0.0}, "ALEATORIA_REDIS_CALL_TIMEOUT"),
    ({"max_connections": 0}, "ALEATORIA_MAX_CONNECTIONS must be at least 1"),
    ({"max_connections": -1}, "ALEATORIA_MAX_CONNECTIONS must be at least 1"),
    ({"max_connections_per_ip": -1}, "ALEATORIA_MAX_CONNECTIONS_PER_IP"),
    ({"handshake_timeout": 0.0}, "ALEATORIA_HANDSHAKE_TIMEOUT"),
    ({"handshake_timeout": -1.0}, "ALEATORIA_HANDSHAKE_TIMEOUT"),
    ({"redis_write_buffer": -1}, "ALEATORIA_REDIS_WRITE_BUFFER"),
    ({"rate_limit": -1.0}, "ALEATORIA_RATE_LIMIT must be >= 0 and ALEATORIA_RATE_BURST >= 1"),
    ({"rate_burst": 0}, "ALEATORIA_RATE_BURST"),
    ({"ping_interval": 0.0}, "ALEATORIA_PING_INTERVAL"),
    # Too large to work: tracebacks inside the server, or a Redis store degraded for good.
    ({"message_ttl_hours": 876_001.0}, "MESSAGE_TTL_HOURS must be at most 876000"),
    ({"history_max": 10**23}, "ALEATORIA_HISTORY_MAX must be at most 1000000"),
    ({"redis_connect_timeout": 1e12}, "ALEATORIA_REDIS_CONNECT_TIMEOUT and .* at most 3600"),
    ({"redis_call_timeout": 3601.0}, "ALEATORIA_REDIS_CALL_TIMEOUT must be at most 3600"),
    ({"rematch_cooldown": 1e300}, "ALEATORIA_REMATCH_COOLDOWN must be at most 31536000"),
    # Not run as a process: the parent started workers until the machine ran out.
    ({"workers": 257, "redis_url": NO_REDIS}, "ALEATORIA_WORKERS must be at most 256"),
]


@pytest.mark.parametrize(("changes", "named"), OUT_OF_RANGE)
def test_a_setting_out_of_range_is_refused_by_name(changes: dict[str, float], named: str) -> None:
    """A value the server cannot work with (a timeout of 0, no connection allowed, a
    negative buffer) is a ConfigError naming its variable, not a crash or a broken server."""
    with pytest.raises(ConfigError, match=named):
        from_environment({}, **changes)


FLOAT_SETTINGS = [s for s in SETTINGS if isinstance(s.default, float)]


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("setting", FLOAT_SETTINGS, ids=[s.env for s in FLOAT_SETTINGS])
def test_a_number_that_is_not_finite_is_refused_by_name(setting: Setting, value: str) -> None:
    """Every setting read with float() refuses NaN and the infinities by name: range checks
    are all False for NaN, and an infinite TTL or budget overflowed int() inside the server."""
    with pytest.raises(ConfigError) as caught:
        from_environment({setting.env: value})
    assert f"{setting.env} must be a finite number, got {float(value)}" == str(caught.value)


def test_the_edges_of_those_ranges_are_accepted() -> None:
    """0 connections per IP means no limit; the smallest useful values pass."""
    config = from_environment(
        {},
        max_connections=1,
        max_connections_per_ip=0,
        handshake_timeout=0.1,
        redis_connect_timeout=0.1,
        redis_call_timeout=0.1,
        redis_write_buffer=1,
        rate_limit=0.0,
    )
    assert (1, 0) == (config.max_connections, config.max_connections_per_ip)
    # The largest values allowed (each checked against a real server and redis-server).
    from_environment(
        {},
        message_ttl_hours=876_000.0,
        history_max=1_000_000,
        redis_connect_timeout=3600.0,
        redis_call_timeout=3600.0,
        rematch_cooldown=31_536_000.0,
        workers=256,
        redis_url=NO_REDIS,
    )


@pytest.mark.parametrize("entry", ["https://chat.example.com", "chat.example.com/", "chat.example.com:web"])
def test_an_allowed_host_that_is_not_a_host_is_refused(entry: str) -> None:
    """A URL or a bad port in ALEATORIA_ALLOWED_HOSTS matched no Host header, silently."""
    with pytest.raises(ConfigError, match=f"ALEATORIA_ALLOWED_HOSTS: '{entry}' is not a host name"):
        from_environment({"ALEATORIA_ALLOWED_HOSTS": f"localhost,{entry}"})


def test_origins_and_hosts_as_documented_are_accepted() -> None:
    """Origins with a default or explicit port, a trailing slash, *; hosts with a port,
    IPv6 literals with and without brackets, *."""
    config = from_environment(
        {
            "ALEATORIA_ALLOWED_ORIGINS": "https://chat.example.com,http://localhost:3000,https://a.example/,*",
            "ALEATORIA_ALLOWED_HOSTS": "chat.example.com,chat.example.com:8443,[::1],::1,10.0.0.5:443,*",
        }
    )
    assert 4 == len(config.allowed_origins)


@pytest.mark.parametrize("name", ["X-IP-\u20ac", "X Real IP", "X-Real-IP ", "X-Real-IP:"])
def test_a_client_ip_header_that_is_not_a_header_name_is_refused(name: str) -> None:
    """A non-latin-1 name was a traceback at every upgrade; a space or a colon matched no
    header, so every client counted as the proxy against the per-address cap."""
    with pytest.raises(ConfigError) as caught:
        from_environment({"ALEATORIA_CLIENT_IP_HEADER": name})
    expected = f"ALEATORIA_CLIENT_IP_HEADER must be an HTTP header name such as X-Real-IP, got {name!r}"
    assert expected == str(caught.value)
    accepted = from_environment({"ALEATORIA_CLIENT_IP_HEADER": "X-Forwarded-For"})
    assert "X-Forwarded-For" == accepted.client_ip_header


@pytest.mark.parametrize("token", ["t\u00f6ken", " token", "token\n", "to\tken"])
def test_an_admin_token_no_request_can_carry_is_refused(token: str) -> None:
    """A non-ASCII admin token (or one with a blank at an end) was taken, and every /admin
    request answered 401; the message does not show the token."""
    with pytest.raises(ConfigError) as caught:
        from_environment({"ALEATORIA_ADMIN_TOKEN": token})
    assert str(caught.value).startswith("ALEATORIA_ADMIN_TOKEN must be printable ASCII")
    assert token.strip() not in str(caught.value)
    assert "a b!~" == from_environment({"ALEATORIA_ADMIN_TOKEN": "a b!~"}).admin_token


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("https://[::1", "Invalid port: ':1'"),
        ("http://", "it has no host"),
        ("http://hooks example.com/x", "it contains a blank"),
        ("https://hooks.example.com:99999/x", "port 99999 is out of range 1-65535"),
    ],
)
def test_a_report_webhook_httpx_cannot_use_is_refused(url: str, problem: str) -> None:
    """The first was a server crash at the first report, the others a webhook that failed
    every delivery; the URL itself is not shown (it often carries the webhook's secret)."""
    with pytest.raises(ConfigError) as caught:
        from_environment({"ALEATORIA_ADMIN_TOKEN": "t", "ALEATORIA_REPORT_WEBHOOK": url})
    assert f"ALEATORIA_REPORT_WEBHOOK is not usable: {problem}" == str(caught.value)
    good = "https://hooks.example.com:8443/aleatoria?key=s3cret"
    assert (
        good
        == from_environment({"ALEATORIA_ADMIN_TOKEN": "t", "ALEATORIA_REPORT_WEBHOOK": good}).report_webhook
    )


def test_a_variable_that_is_not_a_number_says_so() -> None:
    """ALEATORIA_PORT=abc says "must be an integer", not Python's int() message; our own
    parsers keep their message."""
    with pytest.raises(ConfigError) as caught:
        from_environment({"ALEATORIA_PORT": "abc"})
    assert "ALEATORIA_PORT must be an integer, got 'abc'" == str(caught.value)
    with pytest.raises(ConfigError) as caught:
        from_environment({"ALEATORIA_HANDSHAKE_TIMEOUT": "soon"})
    assert "ALEATORIA_HANDSHAKE_TIMEOUT must be a number, got 'soon'" == str(caught.value)
    with pytest.raises(ConfigError, match="ALEATORIA_LOG_FORMAT: expected text or json"):
        from_environment({"ALEATORIA_LOG_FORMAT": "xml"})


@pytest.mark.parametrize(
    ("flags", "env", "message"),
    [
        (
            ["--port", "0", "--redis-url", NO_REDIS, "--redis-call-timeout", "-1"],
            {},
            "ALEATORIA_REDIS_CONNECT_TIMEOUT and ALEATORIA_REDIS_CALL_TIMEOUT must be positive",
        ),
        (["--port", "0", "--max-connections", "0"], {}, "ALEATORIA_MAX_CONNECTIONS must be at least 1"),
        ([], {"ALEATORIA_PORT": "abc"}, "ALEATORIA_PORT must be an integer, got 'abc'"),
        # Dropped silently before: every page of that site got 403 "Origin not allowed".
        (
            [],
            {"ALEATORIA_ALLOWED_ORIGINS": "https://a.example,chat.example.com"},
            "ALEATORIA_ALLOWED_ORIGINS: 'chat.example.com' is not an origin; give it as browsers "
            "send it, scheme and host, e.g. https://chat.example.com",
        ),
        # A traceback at every WebSocket upgrade.
        (
            [],
            {"ALEATORIA_CLIENT_IP_HEADER": "X-IP-\u20ac"},
            "ALEATORIA_CLIENT_IP_HEADER must be an HTTP header name such as X-Real-IP, got 'X-IP-\u20ac'",
        ),
        # It said "Invalid IPv6 URL", about 'redis://[redis://127.0.0.1]:6379/0'.
        (
            [],
            {"VALKEY_HOST": "redis://127.0.0.1"},
            "VALKEY_HOST must be a host name or address, got 'redis://127.0.0.1' "
            "(for a URL, set ALEATORIA_REDIS_URL)",
        ),
        # Taken, then the first report took the whole server down (httpx's InvalidURL).
        (
            [],
            {"ALEATORIA_ADMIN_TOKEN": "t", "ALEATORIA_REPORT_WEBHOOK": "https://[::1"},
            "ALEATORIA_REPORT_WEBHOOK is not usable: Invalid port: ':1'",
        ),
        # Every quiet client was closed as idle: its pongs came too late to count.
        (
            [],
            {"ALEATORIA_IDLE_TIMEOUT": "20"},
            "ALEATORIA_IDLE_TIMEOUT (20 s) must be longer than ALEATORIA_PING_INTERVAL (25 s): a "
            "client that only answers pings would be closed as idle",
        ),
        # Named like every other setting (they said "port must be ..." and "unknown log level").
        (["--port", "-1"], {}, "ALEATORIA_PORT must be 0..65535, got -1"),
        (
            [],
            {"ALEATORIA_LOG_LEVEL": "verbose"},
            "ALEATORIA_LOG_LEVEL must be debug, info, warning or error, got 'verbose'",
        ),
        # float() takes these: the first was a traceback once listening, the second a stop
        # that never ended.
        ([], {"ALEATORIA_PING_INTERVAL": "nan"}, "ALEATORIA_PING_INTERVAL must be a finite number, got nan"),
        (["--shutdown-timeout", "nan"], {}, "ALEATORIA_SHUTDOWN_TIMEOUT must be a finite number, got nan"),
        # An OverflowError traceback at start-up.
        ([], {"MESSAGE_TTL_HOURS": "1e300"}, "MESSAGE_TTL_HOURS must be at most 876000 (100 years)"),
    ],
)
async def test_a_bad_setting_is_one_line_and_exit_2(
    flags: list[str], env: dict[str, str], message: str
) -> None:
    """As a real process: one ``configuration error`` line naming the setting, exit 2,
    nothing started, no traceback (a timeout of -1 was a ValueError traceback, a maximum
    of 0 connections a server answering 503 to everyone)."""
    code, err = await _serve(*flags, env=env)
    assert 2 == code, err
    assert f"aleatoria: configuration error: {message}\n" == err


async def test_a_mistyped_flag_shows_the_serve_usage() -> None:
    """``serve --prot 9000`` answers with the serve command's usage (its flags), exit 2."""
    code, err = await _serve("--prot", "9000")
    assert 2 == code, err
    assert err.startswith("usage: aleatoria serve ")
    assert "--port PORT" in err
    assert "aleatoria serve: error: unrecognized arguments: --prot 9000" in err


async def test_workers_on_a_busy_port_stop_before_starting_any() -> None:
    """``--workers 2`` on a port in use: the parent cannot reserve it, so it starts no
    worker and exits 1 with one start_failed line."""
    with _listening() as port:
        code, err = await _serve("--workers", "2", "--redis-url", NO_REDIS, "--port", str(port))
    assert 1 == code, err
    failed = _lines(err, "event=start_failed")
    assert 1 == len(failed) and "reason=port_in_use" in failed[0], err
    assert "worker_started" not in err
    assert "Traceback" not in err


async def test_workers_with_a_malformed_redis_url_start_none() -> None:
    """``--workers 2`` with a malformed Redis URL: exit 2 at once, no worker started (they
    used to crash and be restarted forever)."""
    code, err = await _serve("--workers", "2", "--redis-url", "redis://127.0.0.1:notaport")
    assert 2 == code, err
    assert "configuration error: ALEATORIA_REDIS_URL" in err
    assert "worker_started" not in err


async def test_a_worker_that_cannot_start_stops_the_parent_with_its_reason() -> None:
    """A worker that fails during start-up (here: another program started listening on the
    port after the parent reserved it) is not restarted: the parent logs one start_failed
    line with the worker's reason, stops the other worker and exits with its status (1)."""
    for _attempt in range(3):
        outcome = await _workers_lose_their_port()
        if outcome is not None:
            break
    else:  # pragma: no cover - three times in a row a worker listened within milliseconds
        pytest.fail("a worker kept listening before the port could be taken")
    code, err = outcome
    assert 1 == code, err
    failed = _lines(err, "event=start_failed")
    assert 1 == len(failed), err
    assert "worker=" in failed[0] and "reason=port_in_use" in failed[0], err
    assert 2 == len(_lines(err, "event=worker_started")), err  # neither worker restarted
    assert "worker_died" not in err
    assert "listening on" not in err
    assert "Traceback" not in err


async def _workers_lose_their_port() -> tuple[int, str] | None:
    """Run ``--workers 2`` on a port that a plain listener takes as soon as the parent has
    reserved it (the parent's socket does not listen, so the kernel lets that listener in,
    and then refuses the workers). None if a worker listened first (the kernel then refuses
    the listener): the caller tries again."""
    with socket.socket() as thief:
        # SO_REUSEADDR on both sides (and nobody listening yet) lets both bind the port.
        thief.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        thief.bind(("127.0.0.1", 0))
        port = thief.getsockname()[1]
        command = [sys.executable, "-m", "aleatoria", "serve", "--workers", "2", "--port", str(port)]
        command += ["--redis-url", NO_REDIS]
        process = await trio.lowlevel.open_process(
            command, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, env=_environment()
        )
        assert process.stderr is not None
        log = bytearray()
        try:
            with trio.fail_after(REPORTED_WITHIN):
                # The parent reserved the port before it started the first worker, and a
                # worker needs far longer to start than this reaction takes.
                async for chunk in process.stderr:
                    log.extend(chunk)
                    if b"event=worker_started" in log:
                        break
                try:
                    thief.listen()
                except OSError:  # pragma: no cover - a worker was faster
                    return None
                async for chunk in process.stderr:
                    log.extend(chunk)
                code = await process.wait()
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
    return code, log.decode(errors="replace")


def test_an_ipv6_valkey_host_is_bracketed_in_the_url() -> None:
    from aleatoria.config import Config

    config = Config(valkey_host="::1", valkey_port=6380).validate()
    assert "redis://[::1]:6380/0" == config.effective_redis_url
