#!/usr/bin/env bash
# Make sure a redis-server binary is available for the Redis tests (tests/redis).
# Does nothing when one is already on PATH (redis-server or valkey-server); otherwise
# installs Debian's redis-server package. Idempotent; needs root (CI runs as root).
set -euo pipefail

usage() {
    cat <<'EOF'
usage: scripts/install-redis.sh [-h|--help]

Make sure a redis-server binary is available for the Redis tests (tests/redis): does
nothing when redis-server or valkey-server is on PATH, else installs Debian's
redis-server package with apt-get (needs root or sudo) and stops the system instance it
starts. Idempotent.
EOF
}
for arg in "$@"; do
    case "$arg" in
        -h | --help) usage; exit 0 ;;
        *) echo "install-redis: unknown argument: $arg" >&2; usage >&2; exit 2 ;;
    esac
done

if command -v redis-server >/dev/null 2>&1 || command -v valkey-server >/dev/null 2>&1; then
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-redis: no redis-server on PATH and no apt-get to install it" >&2
    exit 1
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends redis-server >/dev/null
# The package starts a system instance on 6379; the tests start their own on free ports.
if command -v systemctl >/dev/null 2>&1; then
    $SUDO systemctl stop redis-server >/dev/null 2>&1 || true
fi
command -v redis-server >/dev/null
redis-server --version
