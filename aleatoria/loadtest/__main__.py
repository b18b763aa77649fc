"""``python -m aleatoria.loadtest``: the same program as ``aleatoria-loadtest``."""

from aleatoria.loadtest.launch import main

if __name__ == "__main__":  # spawned worker processes import this module too
    raise SystemExit(main())
