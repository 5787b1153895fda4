#!/usr/bin/env bash
# The standard benchmark suite (`make bench`): builds the release binary, starts the embedded server
# on a free loopback port with a fresh data directory, loads synthetic data, runs every `fhirmesh
# bench` scenario with the bare-hyper baseline, writes bench-results/*.json, and stops the server
# it started (by PID). Bounded: about 4 minutes plus the index catching up between scenarios on 2 cores with the defaults below.
#
# Environment (optional): PATIENTS (synthetic patients loaded, default 200), BENCH_PATIENTS (set-up
# Patients of the scenarios, default 1000), CONNECTIONS (32), DURATION (10s), OUT (bench-results),
# SCENARIOS (a comma-separated subset; default every scenario), LABEL (added to the result file
# names). The server reads FHIRMESH_* variables as usual: `make bench-opensearch` runs the search
# scenarios with the index on OpenSearch this way.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
PATIENTS="${PATIENTS:-200}"
BENCH_PATIENTS="${BENCH_PATIENTS:-1000}"
CONNECTIONS="${CONNECTIONS:-32}"
DURATION="${DURATION:-10s}"
OUT="${OUT:-bench-results}"
SCENARIOS="${SCENARIOS:-}"
LABEL="${LABEL:-}"
CARGO="${CARGO:-cargo}"
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"

"$CARGO" build --release --locked -p fhirmesh
BIN="$TARGET_DIR/release/fhirmesh"

DATA="$(mktemp -d /tmp/fhirmesh-bench.XXXXXX)"
LOG="$DATA/server.log"
SERVER_PID=""
cleanup() {
  if [[ -n "$SERVER_PID" ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill "$SERVER_PID"
    wait "$SERVER_PID" 2>/dev/null || true
  fi
  rm -rf "$DATA"
}
trap cleanup EXIT

# The rest-hook scenario's receiver listens on 127.0.0.1 over http.
FHIRMESH_NOTIFIER__ALLOW_ENDPOINTS='["127.0.0.1"]' FHIRMESH_NOTIFIER__ALLOW_INSECURE_HTTP=true \
  "$BIN" serve --listen 127.0.0.1:0 --data-dir "$DATA/data" >"$LOG" 2>&1 &
SERVER_PID=$!
URL=""
for _ in $(seq 1 100); do
  URL="$(sed -n 's/^fhirmesh: FHIR API listening on \(http:[^ ]*\)$/\1/p' "$LOG" | head -n1)"
  [[ -n "$URL" ]] && break
  kill -0 "$SERVER_PID" 2>/dev/null || { cat "$LOG"; echo "the server exited" >&2; exit 1; }
  sleep 0.1
done
[[ -n "$URL" ]] || { cat "$LOG"; echo "the server did not start" >&2; exit 1; }
echo "server $SERVER_PID at $URL (data in $DATA)"

STAMP="$(date -u +%Y%m%dT%H%M%SZ)${LABEL:+-$LABEL}"
SELECT=()
[[ -n "$SCENARIOS" ]] && SELECT=(--scenario "$SCENARIOS")
mkdir -p "$OUT"
"$BIN" load --url "$URL" --synthetic "$PATIENTS" --seed 1 --concurrency 2 --no-progress \
  --json "$OUT/load-$STAMP.json"
"$BIN" bench --url "$URL" --connections "$CONNECTIONS" --duration "$DURATION" \
  --patients "$BENCH_PATIENTS" "${SELECT[@]}" --json "$OUT/bench-$STAMP.json" | tee "$OUT/bench-$STAMP.txt"
# Latency without queueing: one client, for the scenarios whose targets are latencies
# (transaction-100 p50, write → visible p99).
"$BIN" bench --url "$URL" --connections 1 --duration "$DURATION" --scenario transaction-100,index-lag \
  --patients 100 --no-baseline --json "$OUT/bench-$STAMP-1conn.json" | tee -a "$OUT/bench-$STAMP.txt"
echo "results: $OUT/bench-$STAMP.json, $OUT/bench-$STAMP-1conn.json, $OUT/bench-$STAMP.txt, $OUT/load-$STAMP.json"
