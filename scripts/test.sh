#!/usr/bin/env bash
# Install everything the tests need (venv, Python packages, redis-server, coturn, Chromium) and run
# the whole suite: lint, types, tests. Exits non-zero on the first failure.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "== creating .venv"
    "$PYTHON" -m venv .venv
fi
echo "== installing aleatoria with test extras"
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e '.[test]'

for installer in scripts/install-redis.sh scripts/install-coturn.sh scripts/install-browser.sh; do
    if [ -f "$installer" ]; then
        echo "== $installer"
        VENV="$PWD/.venv" bash "$installer"
    fi
done

echo "== ruff"
.venv/bin/ruff check aleatoria tests scripts
.venv/bin/ruff format --check aleatoria tests scripts
echo "== mypy"
.venv/bin/mypy aleatoria
# The tests too, strict. One run per suite: each has its own conftest and support modules,
# found on its own path (as pytest's rootdir conftests find them).
MYPYPATH=tests .venv/bin/mypy --strict --explicit-package-bases tests/*.py tests/browser
for suite in redis scaleout; do
    MYPYPATH="tests:tests/$suite" .venv/bin/mypy --strict --explicit-package-bases "tests/$suite"
done
echo "== pytest"
.venv/bin/pytest "$@"
