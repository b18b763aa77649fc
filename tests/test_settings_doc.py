"""One source of truth for configuration: every setting is defined once in
``config.SETTINGS`` (name, variable, flag, default, meaning), ``aleatoria serve --help`` shows
each with its default, every variable is read, and the tables in README.md,
docs/operations.md and docs/scaleout.md are exactly what ``SETTINGS`` gives (they are
generated)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs
import pytest

from aleatoria.cli import main
from aleatoria.config import FIXED, SETTINGS, Config, from_environment
from aleatoria.settings_doc import BEGIN, FILES, REGENERATE, SCALE_OUT, SCALE_OUT_BEGIN, with_table

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", FILES)
def test_the_docs_tables_are_generated_from_settings(name: str) -> None:
    """README.md's and docs/operations.md's settings tables (every setting) and
    docs/scaleout.md's (the scale-out ones) are what SETTINGS gives: a setting added,
    renamed, given another default or meaning, or marked scale_out or no longer, without
    regenerating fails here."""
    text = (ROOT / name).read_text()
    assert text == with_table(text, name, FILES[name]), (
        f"{name}'s settings table is out of date with aleatoria/config.py SETTINGS. "
        f"Regenerate it with `{REGENERATE}` (or `.venv/bin/python scripts/settings_table.py`) "
        f"and commit {', '.join(FILES)}."
    )


def test_the_scale_out_table_lists_the_scale_out_settings() -> None:
    """docs/scaleout.md's table holds the settings marked ``scale_out`` (the Redis URL and
    cluster switch, workers, the metrics port, presence TTL and heartbeat), and no table of
    every setting: the markers say which table a file has."""
    assert SCALE_OUT == FILES["docs/scaleout.md"]
    names = [s.name for s in SCALE_OUT.settings()]
    expected = ["redis_url", "redis_cluster", "workers", "metrics_port", "presence_ttl", "heartbeat_interval"]
    assert expected == names
    text = (ROOT / "docs/scaleout.md").read_text()
    assert (1, 0) == (text.count(SCALE_OUT_BEGIN), text.count(BEGIN))
    table = text.split(SCALE_OUT_BEGIN, 1)[1].split("<!--", 1)[0]
    assert [f"`{s.env}`" for s in SCALE_OUT.settings()] == [
        row.split("|")[1].strip() for row in table.strip().splitlines()[2:]
    ]


def test_every_config_field_is_a_setting_or_a_protocol_constant() -> None:
    """Each Config field is a Setting (with a variable and a flag of its own) or one of the
    protocol's fixed limits; each Setting names a Config field; no two share a variable or
    a flag."""
    fields = set(attrs.fields_dict(Config))
    names = [s.name for s in SETTINGS]
    assert fields - FIXED == set(names)
    assert len(names) == len(set(names))
    envs = [s.env for s in SETTINGS]
    flags = [s.flag for s in SETTINGS]
    assert all(envs) and len(envs) == len(set(envs))
    assert all(f.startswith("--") for f in flags) and len(flags) == len(set(flags))


def test_serve_help_shows_every_setting_with_its_default(capsys: pytest.CaptureFixture[str]) -> None:
    """``aleatoria serve --help`` lists every flag with ``(default: ...)`` and its variable."""
    with pytest.raises(SystemExit) as done:
        main(["serve", "--help"])
    assert 0 == done.value.code
    # argparse wraps lines (and breaks words at hyphens): compare without whitespace.
    shown = "".join(capsys.readouterr().out.split())
    for setting in SETTINGS:
        expected = f"(default: {setting.shown_default}) [env {setting.env}]"
        assert setting.flag in shown
        assert "".join(expected.split()) in shown, setting.name
    assert "--log-format" in shown and "[envALEATORIA_LOG_FORMAT]" in shown


def _as_text(value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, tuple):
        return ",".join(value)
    return str(value)


# Values for the settings whose default is unset (a variable must be able to set them).
_SAMPLES = {
    "allowed_hosts": ("chat.example.com",),
    "redis_url": "redis://127.0.0.1:6379/0",
    "valkey_host": "redis.internal",
    "valkey_username": "aleatoria",
    "valkey_password": "secret",
    "auth_secret": "x" * 32,
    "client_ip_header": "X-Real-IP",
    "metrics_port": 9085,
    "sentry_dsn": "https://key@sentry.example.com/1",
    "allowed_origins": ("https://a.example", "https://b.example"),
    "require_origin": True,
    "valkey_use_tls": True,
    "redis_cluster": True,
    "log_format": "json",
    "admin_token": "t" * 32,
    "report_webhook": "https://hooks.example/reports",
}


@pytest.mark.parametrize("setting", SETTINGS, ids=[s.name for s in SETTINGS])
def test_every_setting_is_read_from_its_variable(setting: Any) -> None:
    """Each variable sets its setting (here to a value other than, or equal to, the default)."""
    value = _SAMPLES.get(setting.name, setting.default)
    environ = {setting.env: _as_text(value)}
    if setting.name == "redis_cluster":
        environ["ALEATORIA_REDIS_URL"] = "redis://127.0.0.1:6379/0"
    if setting.name == "report_webhook":  # signed with the admin token: needs one
        environ["ALEATORIA_ADMIN_TOKEN"] = "t" * 32
    config = from_environment(environ)
    assert value == getattr(config, setting.name)
