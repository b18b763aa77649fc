"""Logging set-up: one line per event, ``key=value`` text or JSON."""

from __future__ import annotations

import json
import logging
import sys
import time


class _JsonFormatter(logging.Formatter):
    def __init__(self, worker: int | None = None) -> None:
        super().__init__()
        self._worker = worker

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        if self._worker is not None:
            entry["worker"] = self._worker
        entry["message"] = record.getMessage()
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure(level: str = "info", fmt: str = "text", worker: int | None = None) -> None:
    """Send the ``aleatoria`` loggers to stderr at ``level``. ``worker``: this process is
    worker ``worker`` of ``--workers``, and each line says so (``worker=N``), so that the
    workers' lines, interleaved in one stream, can be told apart."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_JsonFormatter(worker))
    else:
        who = "" if worker is None else f"worker={worker} "
        formatter = logging.Formatter(
            "%(asctime)s.%(msecs)03dZ level=%(levelname)s logger=%(name)s " + who + "%(message)s",
            datefmt="%Y-%m-%dT%H:%M:%S",
        )
        formatter.converter = time.gmtime
        handler.setFormatter(formatter)
    root = logging.getLogger("aleatoria")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
