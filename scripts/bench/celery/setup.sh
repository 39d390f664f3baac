#!/usr/bin/env bash
# Makes (once) a Python venv with Celery 5 and the Redis client, and makes sure a
# redis-server binary is there (Debian's `redis-server` when missing). Idempotent.
#
#   scripts/bench/celery/setup.sh            # venv in $CELERY_VENV (default target/bench/celery-venv)
#
# Prints nothing but errors; exits non-zero if it cannot set things up.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../../.." && pwd)"
venv="${CELERY_VENV:-$root/target/bench/celery-venv}"
if ! command -v redis-server >/dev/null; then
    apt-get install -y redis-server >/dev/null 2>&1 || {
        apt-get update >/dev/null && apt-get install -y redis-server >/dev/null
    }
fi
if [ ! -x "$venv/bin/celery" ]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check 'celery[redis]>=5,<6'
fi
