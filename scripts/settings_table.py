"""Write the settings tables (from aleatoria/config.py SETTINGS) into README.md and
docs/operations.md (every setting) and docs/scaleout.md (the scale-out ones), between their
markers. ``--check``: change nothing, exit 1 if a table is out of date.

    python scripts/settings_table.py            # regenerate
    python scripts/settings_table.py --check    # what the test checks
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from aleatoria.settings_doc import FILES, with_table

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check; exit 1 if out of date")
    args = parser.parse_args()
    stale = []
    for name in FILES:
        path = ROOT / name
        text = path.read_text()
        current = with_table(text, name, FILES[name])
        if current != text:
            stale.append(name)
            if not args.check:
                path.write_text(current)
    if args.check and stale:
        print(f"out of date: {', '.join(stale)} (run: python scripts/settings_table.py)", file=sys.stderr)
        return 1
    for name in stale:
        print(f"updated {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
