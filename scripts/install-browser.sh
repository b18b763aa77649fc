#!/bin/sh
# Install what the browser tests (tests/browser) need, if it is missing:
#   - Debian's chromium package (apt-get), when /usr/bin/chromium is absent;
#   - the playwright Python package (pip) into the project's Python.
# Never runs `playwright install`: the tests drive the system Chromium, and downloading a
# browser fails on closed networks anyway.
#
# Python: $PYTHON if set, else the active virtualenv, else ./.venv, else python3.
# Where something cannot be installed (no apt-get, not root and no sudo, no network) this
# says why and exits 0, and the tests skip with a reason; with ALEATORIA_REQUIRE_BROWSER=1
# it exits 1 instead, for CI machines that must run the browser tests.
set -eu

usage() {
    cat <<'EOF'
usage: scripts/install-browser.sh [-h|--help]

Install what the browser tests (tests/browser) need, if it is missing: Debian's chromium
package (apt-get, needs root or sudo) and the playwright Python package (pip, into
$PYTHON, the active virtualenv, ./.venv or python3). Never runs `playwright install`.
Exits 0 when something cannot be installed (the tests then skip, saying why), 1 with
ALEATORIA_REQUIRE_BROWSER=1.
EOF
}
for arg in "$@"; do
    case "$arg" in
        -h | --help) usage; exit 0 ;;
        *) printf 'install-browser: unknown argument: %s\n' "$arg" >&2; usage >&2; exit 2 ;;
    esac
done

cd "$(dirname "$0")/.."

missing=0
say() { printf 'install-browser: %s\n' "$*" >&2; }

if [ -n "${PYTHON:-}" ]; then
    py=$PYTHON
elif [ -n "${VIRTUAL_ENV:-}" ] && [ -x "$VIRTUAL_ENV/bin/python" ]; then
    py=$VIRTUAL_ENV/bin/python
elif [ -x .venv/bin/python ]; then
    py=.venv/bin/python
else
    py=python3
fi

# --- Chromium -------------------------------------------------------------------------
if [ -x /usr/bin/chromium ] || [ -n "${ALEATORIA_CHROMIUM:-}" ]; then
    say "chromium present: ${ALEATORIA_CHROMIUM:-/usr/bin/chromium}"
elif ! command -v apt-get >/dev/null 2>&1; then
    say "no /usr/bin/chromium and no apt-get: install Chromium yourself and set ALEATORIA_CHROMIUM"
    missing=1
else
    if [ "$(id -u)" -eq 0 ]; then
        sudo=""
    elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        sudo="sudo -n"
    else
        sudo=none
    fi
    if [ "$sudo" = none ]; then
        say "chromium is missing and installing it needs root (run: sudo apt-get install chromium)"
        missing=1
    else
        say "installing chromium with apt-get"
        # `apt-get update` first only when the package is unknown (a fresh container).
        if ! apt-cache show chromium >/dev/null 2>&1; then
            $sudo apt-get update -q || say "apt-get update failed"
        fi
        if ! DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends \
            chromium; then
            say "apt-get could not install chromium"
            missing=1
        fi
    fi
fi

# --- Playwright (the Python package only) ---------------------------------------------
if "$py" -c 'import playwright.sync_api' 2>/dev/null; then
    say "playwright present for $py"
else
    say "installing the playwright package for $py"
    if ! "$py" -m pip install --quiet playwright; then
        say "pip could not install playwright"
        missing=1
    fi
fi

if [ "$missing" -ne 0 ]; then
    if [ "${ALEATORIA_REQUIRE_BROWSER:-0}" = 1 ]; then
        say "ALEATORIA_REQUIRE_BROWSER=1 and something is missing: failing"
        exit 1
    fi
    say "the browser tests will be skipped (they say why)"
fi
exit 0
