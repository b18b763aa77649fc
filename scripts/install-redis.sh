#!/usr/bin/env bash
# Make sure a redis-server binary is available for the Redis tests (tests/redis).
# Does nothing when one is already on PATH (redis-server or valkey-server); otherwise
# installs Debian's redis-server package. Idempotent; needs root (CI runs as root).
set -euo pipefail

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
