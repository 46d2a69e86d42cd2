#!/usr/bin/env bash
# Sale pages at transport speed (issue 18): requests/s of the public progress
# reads against GET /healthz, measured with an external generator (wrk) in
# one run, on a fresh SQLite data directory, loopback only, no purchase
# storm running.
#
#   scripts/bench-progress-reads.sh [LEDGER_BINARY ...]
#
# Each binary (default target/release/ledger) gets its own server on
# 127.0.0.1:$PORT (default 18080); wrk runs -t2 -c1000 -d10s against
# /healthz, /v1/progress and /v1/products/fund-a/progress (one product
# listed and opened first). The per-client rate limit is raised so that the
# figures measure serving, not 429s.
set -euo pipefail
PORT=${PORT:-18080}
DURATION=${DURATION:-10s}
CONNECTIONS=${CONNECTIONS:-1000}
THREADS=${THREADS:-2}
[ $# -gt 0 ] || set -- target/release/ledger
command -v wrk >/dev/null || { echo "wrk is missing (apt-get install -y wrk)" >&2; exit 1; }
ulimit -n 65536 2>/dev/null || true

URL=http://127.0.0.1:$PORT
json() { python3 -c "import json,sys; print(json.load(sys.stdin)['$1'])"; }
rate() { # route -> requests/s and non-2xx count
  local out
  out=$(wrk -t"$THREADS" -c"$CONNECTIONS" -d"$DURATION" --latency "$URL$1")
  printf '%-34s %12s req/s  p50 %8s  p99 %8s  non-2xx %s\n' "$1" \
    "$(awk '/^Requests\/sec/ {print $2}' <<<"$out")" \
    "$(awk '$1=="50%" {print $2}' <<<"$out")" \
    "$(awk '$1=="99%" {print $2}' <<<"$out")" \
    "$(awk '/Non-2xx/ {print $NF}' <<<"$out" | grep . || echo 0)"
}

for binary in "$@"; do
  data=$(mktemp -d)
  LEDGER_ADMIN_USER=admin LEDGER_ADMIN_PASSWORD=change-me-now RUST_LOG=warn \
    "$binary" serve --data-dir "$data" --listen "127.0.0.1:$PORT" \
    --rate-limit 4000000000 --rate-burst 4000000000 >"$data/serve.log" 2>&1 &
  server=$!
  for _ in $(seq 1 100); do curl -fs "$URL/healthz" >/dev/null && break; sleep 0.1; done
  admin=$(curl -fs "$URL/v1/auth/login" -H 'content-type: application/json' \
    -d '{"username":"admin","password":"change-me-now"}' | json token)
  curl -fs "$URL/v1/products" -H "authorization: Bearer $admin" -H 'content-type: application/json' \
    -d '{"product_id":"fund-a","name":"Fund A","quota":1000000,"min_purchase":100,"max_purchase":100000,"annual_rate_bps":450,"term_days":90}' >/dev/null
  curl -fs -X POST "$URL/v1/products/fund-a/open" -H "authorization: Bearer $admin" >/dev/null
  for _ in $(seq 1 100); do
    curl -fs "$URL/v1/products/fund-a/progress" | grep -q '"status":"open"' && break
    sleep 0.1
  done
  echo "== $binary ($(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg))"
  curl -fs "$URL/v1/products/fund-a/progress"; echo
  rate /healthz
  rate /v1/progress
  rate /v1/products/fund-a/progress
  kill -TERM "$server"
  wait "$server" || true
  rm -rf "$data"
done
