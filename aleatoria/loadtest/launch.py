"""The ``aleatoria-loadtest`` entry point: checks the load-test extras before the tool
imports them, so a plain ``pip install aleatoria`` gets one clear line instead of a
``ModuleNotFoundError`` traceback (also for ``--help``)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

# What the tool imports at start-up (matplotlib only for --plot: see plot.py).
EXTRAS = ("trio_websocket", "rich")
INSTALL = "pip install 'aleatoria[loadtest]'"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the load-test tool, or say which extras are missing (exit status 2)."""
    missing = []
    for name in EXTRAS:
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        print(
            f"aleatoria-loadtest needs the load-test extras ({', '.join(missing)} not installed): {INSTALL}",
            file=sys.stderr,
        )
        return 2
    from aleatoria.loadtest.cli import main as run

    return run(argv)
