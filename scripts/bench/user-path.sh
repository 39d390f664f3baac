#!/usr/bin/env bash
# The user-path bench (BENCHMARKS.md, first section): builds the release binaries, installs
# GNU parallel (Debian) and the Celery venv when missing, then runs scripts/bench/user_path.py
# with the arguments given (`--help` lists them; e.g. `--rounds 1 --only local`).
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$root"
if ! command -v parallel >/dev/null || ! command -v xargs >/dev/null; then
    apt-get install -y parallel findutils >/dev/null 2>&1 || {
        apt-get update >/dev/null && apt-get install -y parallel findutils >/dev/null
    }
fi
scripts/bench/celery/setup.sh
cargo build --release -q -p orchestrator -p jobs-worker
exec python3 scripts/bench/user_path.py "$@"
