#!/usr/bin/env python3
"""Thin wrapper: ``python scripts/loadtest.py SCENARIO ...`` runs ``aleatoria-loadtest``.

Needs the package importable (``pip install -e .[loadtest]``, or run from the
repository root: the root is put on ``sys.path`` below for that case).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from aleatoria.loadtest.launch import main

if __name__ == "__main__":  # spawned worker processes import this module too
    raise SystemExit(main())
