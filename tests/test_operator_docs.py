"""docs/operations.md tells operators what the server really does: its log table names every
event the code can log, and its log example lines have the real shape."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest

from aleatoria import logs

ROOT = Path(__file__).resolve().parents[1]
OPERATIONS = (ROOT / "docs" / "operations.md").read_text()


def _code_events() -> set[str]:
    """Every ``event=NAME`` the server's code (not the load-test tool's) can log."""
    found: set[str] = set()
    for path in (ROOT / "aleatoria").rglob("*.py"):
        if "loadtest" not in path.parts:
            found |= set(re.findall(r"event=([a-z_]+)", path.read_text()))
    return found


def _documented_events() -> set[str]:
    table = OPERATIONS.split("<!-- log-events -->", 1)[1].split("<!-- /log-events -->", 1)[0]
    names: set[str] = set()
    for row in table.splitlines():
        if row.startswith("| `"):
            names |= set(re.findall(r"`([a-z_]+)`", row.split("|")[1]))
    return names


def test_the_log_table_names_every_event() -> None:
    """An event added to the code without a row in the table fails here (and a row for an
    event the code no longer logs)."""
    assert _code_events() == _documented_events()


_TEXT = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z level=[A-Z]+ logger=aleatoria\.\w+ event=\w+")


def _real_line(fmt: str, capsys: pytest.CaptureFixture[str]) -> str:
    """One line as the server's logging writes it in ``fmt``."""
    root = logging.getLogger("aleatoria")
    saved = (root.handlers[:], root.level, root.propagate)
    logs.configure("info", fmt)
    try:
        logging.getLogger("aleatoria.server").info("event=connected user=%s room=%s", "a", "L")
    finally:
        root.handlers[:], root.level, root.propagate = saved
    return capsys.readouterr().err.strip()


def test_a_workers_lines_say_which_worker(capsys: pytest.CaptureFixture[str]) -> None:
    """Under --workers, each worker's lines carry worker=I after the logger (JSON: a
    ``worker`` key), so interleaved lines of several workers can be told apart."""
    root = logging.getLogger("aleatoria")
    saved = (root.handlers[:], root.level, root.propagate)
    try:
        for fmt in ("text", "json"):
            logs.configure("info", fmt, worker=1)
            logging.getLogger("aleatoria.server").info("event=shutdown_done")
    finally:
        root.handlers[:], root.level, root.propagate = saved
    text, line = capsys.readouterr().err.strip().splitlines()
    assert "logger=aleatoria.server worker=1 event=shutdown_done" in text
    assert (1, "event=shutdown_done") == (json.loads(line)["worker"], json.loads(line)["message"])


def test_the_log_examples_have_the_real_shape(capsys: pytest.CaptureFixture[str]) -> None:
    """The text example lines have the shape logs.configure writes (UTC time with
    milliseconds, level, logger, then the event); the JSON example has the real keys."""
    section = OPERATIONS.split("## Logs", 1)[1]
    text_example = section.split("```text", 1)[1].split("```", 1)[0].strip().splitlines()
    assert _TEXT.match(_real_line("text", capsys))
    assert text_example and all(_TEXT.match(line) for line in text_example), text_example
    json_example = json.loads(section.split("```json", 1)[1].split("```", 1)[0])
    real = json.loads(_real_line("json", capsys))
    assert sorted(real) == sorted(json_example)
    assert (real["level"], real["logger"]) == (json_example["level"], json_example["logger"])
