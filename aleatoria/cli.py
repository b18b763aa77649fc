"""The ``aleatoria`` command. A thin ``main(argv) -> int`` that tests can call."""

from __future__ import annotations

import argparse
import gc
import logging
import os
import signal
import sys
from collections.abc import Sequence
from functools import partial
from typing import Any

import trio

from aleatoria import __version__, logs
from aleatoria.auth import make_token, parse_duration
from aleatoria.config import SETTINGS, Config, ConfigError, from_environment
from aleatoria.limits import id_problem
from aleatoria.server import serve
from aleatoria.workers import exit_when_parent_dies, run_workers

log = logging.getLogger("aleatoria.cli")

# Flags whose spelling differs from the setting name, or that take repeated values.
_FLAG_NAMES = {"allowed_origins": "--allowed-origin"}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aleatoria",
        description="Real-time server for random video-chat apps (rooms, DMs, matching, signaling).",
    )
    parser.add_argument("--version", action="version", version=f"aleatoria {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve_cmd = commands.add_parser(
        "serve",
        help="run the server",
        description="Run the server. Every flag has an environment variable; flags win.",
    )
    for setting in SETTINGS:
        flag = _FLAG_NAMES.get(setting.name, "--" + setting.name.replace("_", "-"))
        helptext = f"{setting.help} [env {setting.env}]"
        if setting.name == "allowed_origins":
            serve_cmd.add_argument(
                flag, dest="allowed_origins", action="append", metavar="ORIGIN", help=helptext
            )
        elif setting.parse is bool or setting.name in {"require_origin", "valkey_use_tls", "redis_cluster"}:
            serve_cmd.add_argument(
                flag, dest=setting.name, action="store_const", const=True, default=None, help=helptext
            )
        else:
            serve_cmd.add_argument(flag, dest=setting.name, type=setting.parse, default=None, help=helptext)
    serve_cmd.add_argument("--log-format", choices=("text", "json"), default="text", help="log line format")
    # Internal: set by the --workers parent on each worker it starts.
    serve_cmd.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)

    token_cmd = commands.add_parser(
        "token",
        help="print a token for a user (development)",
        description="Print an HS256 JWT whose sub is USERID, signed with the auth secret.",
    )
    token_cmd.add_argument("user", metavar="USERID")
    token_cmd.add_argument("--ttl", default="1h", help="validity, e.g. 90s, 15m, 1h, 2d (default 1h)")
    token_cmd.add_argument("--secret", help="signing secret [env ALEATORIA_AUTH_SECRET]")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    raw = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(raw)
    if args.command == "serve":
        return _serve(args, raw[raw.index("serve") + 1 :])
    if args.command == "token":
        return _token(args)
    return 2  # pragma: no cover - argparse rejects unknown commands


def _token(args: argparse.Namespace) -> int:
    secret = args.secret or os.environ.get("ALEATORIA_AUTH_SECRET") or ""
    if not secret:
        print("aleatoria: token needs --secret or ALEATORIA_AUTH_SECRET", file=sys.stderr)
        return 2
    try:
        ttl = parse_duration(args.ttl)
    except ValueError as exc:
        print(f"aleatoria: {exc}", file=sys.stderr)
        return 2
    problem = id_problem(args.user)
    if problem:
        print(f"aleatoria: userId {problem}", file=sys.stderr)
        return 2
    print(make_token(args.user, secret, ttl))
    return 0


def _serve(args: argparse.Namespace, serve_args: Sequence[str]) -> int:
    overrides: dict[str, Any] = {s.name: getattr(args, s.name, None) for s in SETTINGS}
    if overrides.get("allowed_origins") is not None:
        origins: list[str] = []
        for value in overrides["allowed_origins"]:
            origins.extend(part.strip() for part in value.split(",") if part.strip())
        overrides["allowed_origins"] = tuple(origins)
    try:
        config = from_environment(**overrides)
    except ConfigError as exc:
        print(f"aleatoria: configuration error: {exc}", file=sys.stderr)
        return 2
    logs.configure(config.log_level, args.log_format)
    _start_error_reporting()
    if not config.auth_secret:
        log.warning("event=auth_disabled detail=%r", "no ALEATORIA_AUTH_SECRET: userIds are trusted")
    elif len(config.auth_secret) < 32:
        log.warning("event=auth_weak_secret detail=%r", "ALEATORIA_AUTH_SECRET is shorter than 32 bytes")
    try:
        if config.workers > 1 and args.worker is None:
            return run_workers(config, serve_args)
        _tune_garbage_collector()
        trio.run(_run, config, args.worker)
    except OSError as exc:
        log.error("event=start_failed error=%r", exc)
        return 1
    return 0


def _tune_garbage_collector() -> None:
    """Fewer, larger young-generation collections, and start-up objects left out of them.

    Measured: 16 % of the CPU of a burst of 5,000 handshakes went to the cyclic collector
    at CPython's default threshold (700 allocations). A server's garbage is mostly acyclic
    (freed by reference counting); the collector only needs to run now and then.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)


def _start_error_reporting() -> None:
    """Report errors to Sentry when SENTRY_DSN is set (the original server did)."""
    dsn = os.environ.get("SENTRY_DSN", "")
    if not dsn:
        return
    try:
        import sentry_sdk  # optional dependency, imported only when asked for
    except ImportError:
        log.warning("event=sentry_unavailable detail=%r", "SENTRY_DSN is set but sentry-sdk is not installed")
        return
    sentry_sdk.init(dsn=dsn, release=f"aleatoria@{__version__}", send_default_pii=False)
    log.info("event=sentry_enabled")


async def _run(config: Config, worker: int | None) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_stop_on_signal, nursery.cancel_scope)
        if worker is None:
            await nursery.start(serve, config)
            return
        await nursery.start(partial(serve, config, reuse_port=True, worker=worker))
        nursery.start_soon(exit_when_parent_dies, nursery.cancel_scope)
        sys.stdout.write("ready\n")
        sys.stdout.flush()


async def _stop_on_signal(scope: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            log.info("event=signal signal=%s", signal.Signals(signum).name)
            scope.cancel()
            return
