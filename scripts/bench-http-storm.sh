#!/usr/bin/env bash
# Live progress during a purchase storm (issue 18): `ledger bench http
# --external wrk`, 1,000 connections each with its own user and token, one
# hot product, idempotency keys on, for 15 s, on SQLite and (when
# DATABASE_URL is set) on PostgreSQL. The benchmark samples every 100 ms how
# far the public progress and the other read models trail the log, prints
# the largest lag in seconds and how long the read models take to catch up
# after the storm, then checks the log and the read models.
#
#   scripts/bench-http-storm.sh [LEDGER_BINARY]      (default target/release/ledger)
#
# SECONDS_STORM, CLIENTS and QUOTA change the storm (the quota is large so
# that the product does not sell out before the storm ends); JSON=1 prints
# one JSON object per backend instead of the tables.
set -euo pipefail
binary=${1:-target/release/ledger}
SECONDS_STORM=${SECONDS_STORM:-15}
CLIENTS=${CLIENTS:-1000}
QUOTA=${QUOTA:-1000000000}
if ! command -v wrk >/dev/null; then
  echo "wrk is missing: installing it with apt-get" >&2
  apt-get install -y wrk >/dev/null 2>&1 || { apt-get update >/dev/null && apt-get install -y wrk >/dev/null; }
fi
# The server's and wrk's sockets, a thousand of each, share this process's limit.
ulimit -n 65536 2>/dev/null || true
json=()
[ "${JSON:-0}" = 1 ] && json=(--json)
run() {
  echo "== $* ($(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg))"
  "$binary" bench http --external wrk --clients "$CLIENTS" --quota "$QUOTA" --amount 100 \
    --seconds "$SECONDS_STORM" "${json[@]}" "$@"
}
run --backend sqlite
if [ -n "${DATABASE_URL:-}" ]; then
  run --backend postgres --database-url "$DATABASE_URL"
else
  echo "skipped PostgreSQL: DATABASE_URL is not set"
fi
