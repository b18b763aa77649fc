"""The ``aleatoria`` command. A thin ``main(argv) -> int`` that tests can call."""

from __future__ import annotations

import argparse
import contextlib
import errno
import gc
import logging
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Sequence
from functools import partial
from typing import Any

import trio

from aleatoria import __version__, admin_cli, logs
from aleatoria.auth import MIN_SECRET_BYTES, make_token, parse_duration
from aleatoria.config import SETTINGS, Config, ConfigError, from_environment
from aleatoria.limits import id_problem
from aleatoria.overview import open_view_listener
from aleatoria.portlock import lock_port
from aleatoria.server import serve
from aleatoria.workers import (
    hold_stop_signals,
    ignore_stop_signals,
    noted_then,
    release_wakeup_fd,
    reserve_port,
    run_workers,
    stop_when_parent_says,
)

log = logging.getLogger("aleatoria.cli")


def _parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The ``aleatoria`` parser and its sub-commands' parsers, by name."""
    parser = argparse.ArgumentParser(
        prog="aleatoria",
        description="Real-time server for random video-chat apps (rooms, DMs, matching, signaling).",
    )
    parser.add_argument("--version", action="version", version=f"aleatoria {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve_cmd = commands.add_parser(
        "serve",
        help="run the server",
        description="Run the server. Every flag has an environment variable; flags win, and a "
        "variable set to the empty string counts as unset.",
    )
    for setting in SETTINGS:
        helptext = f"{setting.help} (default: {setting.shown_default}) [env {setting.env}]"
        # argparse expands % in help texts
        helptext = helptext.replace("%", "%%")
        if setting.repeatable:
            serve_cmd.add_argument(
                setting.flag, dest=setting.name, action="append", metavar="LIST", help=helptext
            )
        elif setting.switch:
            serve_cmd.add_argument(
                setting.flag, dest=setting.name, action="store_const", const=True, default=None, help=helptext
            )
        else:
            serve_cmd.add_argument(
                setting.flag, dest=setting.name, type=_flag_type(setting.parse), default=None, help=helptext
            )
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
    admin_cmd = admin_cli.add_parser(commands)
    return parser, {"serve": serve_cmd, "token": token_cmd, "admin": admin_cmd}


def _flag_type(parse: Any) -> Any:
    """``parse`` for argparse: our parsers' own message on a bad value (argparse would say
    "invalid _parse_log_format value"); int, float and str keep argparse's."""
    if parse in (int, float, str):
        return parse

    def flag_value(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return flag_value


def main(argv: Sequence[str] | None = None) -> int:
    raw = list(sys.argv[1:] if argv is None else argv)
    parser, commands = _parser()
    args, unknown = parser.parse_known_args(raw)
    if unknown:
        # argparse would answer a sub-command's unknown flag (``serve --prot 9000``) with the
        # top-level usage, which lists none of the sub-command's flags: show the right one.
        commands[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.command == "serve":
        return _serve(args, raw[raw.index("serve") + 1 :])
    if args.command == "token":
        return _token(args)
    if args.command == "admin":
        return admin_cli.run(args)
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
    if ttl < 1:  # exp is whole seconds: --ttl 0 (or 0.5) printed a token already expired
        print(f"aleatoria: --ttl must be at least 1s, got {args.ttl!r}", file=sys.stderr)
        return 2
    problem = id_problem(args.user)
    if problem:
        print(f"aleatoria: userId {problem}", file=sys.stderr)
        return 2
    if len(secret.encode()) < MIN_SECRET_BYTES:
        print(
            f"aleatoria: warning: the secret is {len(secret.encode())} bytes; use at least "
            f"{MIN_SECRET_BYTES} random bytes outside development (the server warns too)",
            file=sys.stderr,
        )
    print(make_token(args.user, secret, ttl))
    return 0


def _serve(args: argparse.Namespace, serve_args: Sequence[str]) -> int:
    overrides: dict[str, Any] = {s.name: getattr(args, s.name, None) for s in SETTINGS}
    for setting in SETTINGS:
        values = overrides[setting.name]
        if setting.repeatable and values is not None:  # each value parsed, then added up
            overrides[setting.name] = tuple(item for value in values for item in setting.parse(value))
    try:
        config = from_environment(**overrides)
    except ConfigError as exc:
        print(f"aleatoria: configuration error: {exc}", file=sys.stderr)
        return 2
    logs.configure(config.log_level, config.log_format, args.worker)
    _start_error_reporting(config)
    if args.worker is None:  # once per deployment: a --workers parent speaks for its workers
        _warn_about_auth(config)
    if config.workers > 1 and args.worker is None:
        try:
            reserved = reserve_port(config.host, config.port)
        except OSError as exc:
            return _start_failed(config, [exc], worker=None)
        with reserved, contextlib.ExitStack() as held:
            try:
                # Another deployment may share the port (SO_REUSEPORT): the lock says so.
                lock = lock_port(reserved.getsockname()[1])
                if lock is not None:
                    held.enter_context(lock)
                view = _open_metrics_port(config)
                if view is not None:
                    held.enter_context(view)
            except OSError as exc:
                return _start_failed(config, [exc], worker=None)
            return run_workers(config, serve_args, reserved, view)
    _tune_garbage_collector()
    if args.worker is not None:
        ignore_stop_signals()  # the drain's signal handlers are _run's; see there
    failed = trio.run(_run, config, args.worker)
    ignore_stop_signals()  # on the way out: see ``hold_stop_signals``
    if failed:
        return _start_failed(config, failed, worker=args.worker)
    return 0


def _open_metrics_port(config: Config) -> socket.socket | None:
    """The --workers parent's listener on ``metrics_port`` (None when unset)."""
    if config.metrics_port is None:
        return None
    try:
        return open_view_listener((config.host, config.metrics_port))
    except OSError as exc:
        raise OSError(exc.errno, f"metrics port {config.metrics_port}: {exc.strerror}") from None


def _warn_about_auth(config: Config) -> None:
    if not config.auth_secret:
        log.warning("event=auth_disabled detail=%r", "no ALEATORIA_AUTH_SECRET: userIds are trusted")
    elif len(config.auth_secret.encode()) < MIN_SECRET_BYTES:
        log.warning("event=auth_weak_secret detail=%r", "ALEATORIA_AUTH_SECRET is shorter than 32 bytes")


# Why the server could not listen, for the ``start_failed`` line (exit status 1: the
# configuration was valid, the machine refused it; a setting no machine accepts is a
# ConfigError, exit status 2, found before anything starts).
_REASONS = {
    errno.EADDRINUSE: "port_in_use",
    errno.EADDRNOTAVAIL: "address_not_available",
    errno.EAFNOSUPPORT: "address_not_available",
    errno.EACCES: "permission_denied",
}


def _start_failed(config: Config, errors: Sequence[OSError], *, worker: int | None) -> int:
    """Report what kept the server from starting in one ``event=start_failed`` line; the
    exit status (1). A worker hands the line to its parent instead (workers.py), which
    logs it once for the whole server."""
    reasons = ",".join(dict.fromkeys(_reason(exc) for exc in errors))
    where = f"[{config.host}]" if ":" in config.host else config.host
    line = f"reason={reasons} address={where}:{config.port} error={'; '.join(map(str, errors))!r}"
    if worker is None:
        log.error("event=start_failed %s", line)
    else:
        _tell_parent(f"start_failed {line}")
    return 1


def _reason(exc: OSError) -> str:
    if isinstance(exc, socket.gaierror):
        return "unknown_host"
    return _REASONS.get(exc.errno or 0, "os_error")


def _leaves(group: BaseExceptionGroup[OSError]) -> list[OSError]:
    """The OSErrors of a (possibly nested) group, in order."""
    found: list[OSError] = []
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            found.extend(_leaves(exc))
        else:
            found.append(exc)
    return found


def _tell_parent(line: str) -> None:
    # A worker's stdout is a pipe its parent reads line by line (workers.py).
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _tune_garbage_collector() -> None:
    """Fewer, larger young-generation collections, and start-up objects left out of them.

    Measured: 16 % of the CPU of a burst of 5,000 handshakes went to the cyclic collector
    at CPython's default threshold (700 allocations). A server's garbage is mostly acyclic
    (freed by reference counting); the collector only needs to run now and then.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)


def _start_error_reporting(config: Config) -> None:
    """Report errors to Sentry when SENTRY_DSN is set (the original server did)."""
    dsn = config.sentry_dsn
    if not dsn:
        return
    try:
        import sentry_sdk  # optional dependency, imported only when asked for
    except ImportError:
        log.warning("event=sentry_unavailable detail=%r", "SENTRY_DSN is set but sentry-sdk is not installed")
        return
    sentry_sdk.init(dsn=dsn, release=f"aleatoria@{__version__}", send_default_pii=False)
    log.info("event=sentry_enabled")


async def _run(config: Config, worker: int | None) -> list[OSError]:
    """Serve until SIGINT or SIGTERM (or, in a worker, until the parent says stop or is gone). Returns the
    errors that kept the server from starting (trio raises them in a group, hence
    ``except*``), or [] once it ran. An error after start-up is a bug: it propagates."""
    failed: list[OSError] = []
    # The handlers stay ours until the shutdown is over: a second signal (a worker gets the
    # terminal's SIGINT, or systemd's SIGTERM to the group, and then its parent's SIGTERM)
    # must not kill a draining server. The drain is bounded by shutdown_timeout. A worker
    # ignores both signals outside this block (``ignore_stop_signals``): its parent's stop
    # request also comes on stdin, which it watches from the start.
    # Nor a process that is done: leaving the receiver puts back the handlers it found and
    # re-raises a signal it holds, so those handlers only note a signal (``hold_stop_signals``).
    early = hold_stop_signals()
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_stop_on_signal, noted_then(early, signals), nursery.cancel_scope)
            if worker is not None:
                nursery.start_soon(stop_when_parent_says, nursery.cancel_scope)
            try:
                await nursery.start(partial(serve, config, reuse_port=worker is not None, worker=worker))
            except* OSError as group:
                failed = _leaves(group)
            if failed:
                nursery.cancel_scope.cancel()
            elif worker is not None:
                _tell_parent("ready")
    release_wakeup_fd()
    return failed


async def _stop_on_signal(signals: AsyncIterator[int], scope: trio.CancelScope) -> None:
    async for signum in signals:
        log.info("event=signal signal=%s", signal.Signals(signum).name)
        scope.cancel()
        return
