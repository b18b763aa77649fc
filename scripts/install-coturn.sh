#!/usr/bin/env bash
# Make sure coturn's turnserver and turnutils_uclient are available for the TURN tests
# (tests/test_turn.py and the relay-only browser test). Does nothing when both are on PATH;
# otherwise installs Debian's coturn package. Idempotent; needs root (CI runs as root).
# The tests start their own turnserver on free loopback ports; the package's own service is
# stopped and left disabled, as a fresh Debian install leaves it.
set -euo pipefail

usage() {
    cat <<'EOF'
usage: scripts/install-coturn.sh [-h|--help]

Make sure coturn's turnserver and turnutils_uclient are available for the TURN tests
(tests/test_turn.py, the relay-only browser test): does nothing when both are on PATH,
else installs Debian's coturn package with apt-get (needs root or sudo) and stops its
service (the tests start their own turnserver). Idempotent.
EOF
}
for arg in "$@"; do
    case "$arg" in
        -h | --help) usage; exit 0 ;;
        *) echo "install-coturn: unknown argument: $arg" >&2; usage >&2; exit 2 ;;
    esac
done

if command -v turnserver >/dev/null 2>&1 && command -v turnutils_uclient >/dev/null 2>&1; then
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-coturn: no turnserver on PATH and no apt-get to install it" >&2
    exit 1
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi

export DEBIAN_FRONTEND=noninteractive
# `apt-get update` first only when the package is unknown (a fresh container).
if ! apt-cache show coturn >/dev/null 2>&1; then
    $SUDO apt-get update -qq
fi
$SUDO apt-get install -y -qq --no-install-recommends coturn >/dev/null
if command -v systemctl >/dev/null 2>&1; then
    $SUDO systemctl stop coturn >/dev/null 2>&1 || true
fi
command -v turnserver >/dev/null
command -v turnutils_uclient >/dev/null
turnserver --version 2>/dev/null || true
