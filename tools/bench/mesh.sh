#!/usr/bin/env bash
# The mesh benchmark (`make bench-mesh`): the same `fhirmesh bench` scenarios as `make bench`, run
# against the services as separate processes on this machine — gateway → gRPC → resource service
# (SQLite store and index under one data directory), relay → NATS JetStream → indexer — so the
# figures sit beside the embedded ones. Starts its own nats-server (JetStream, a free port of
# 127.0.0.1, state in a temporary directory) and every service, and stops them all by PID.
# Bounded: about 2 minutes plus the release build.
#
# SQLite wakes only in-process consumers of its change log: here the relay polls it (every
# 250 ms), which the index-lag figure includes. The mesh on DynamoDB + Streams is not measured:
# the only DynamoDB here is moto, an in-memory mock whose speed says nothing about DynamoDB's.
#
# Environment (optional): PATIENTS (synthetic patients loaded, default 200), BENCH_PATIENTS
# (1000), CONNECTIONS (32), DURATION (10s), OUT (bench-results), SCENARIOS (default
# read,create,search-token,index-lag), TLS=1 (the gateway calls the resource service over mTLS,
# with a CA and certificate made by openssl for the run).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
PATIENTS="${PATIENTS:-200}"
BENCH_PATIENTS="${BENCH_PATIENTS:-1000}"
CONNECTIONS="${CONNECTIONS:-32}"
DURATION="${DURATION:-10s}"
OUT="${OUT:-bench-results}"
SCENARIOS="${SCENARIOS:-read,create,search-token,index-lag}"
CARGO="${CARGO:-cargo}"
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
TLS="${TLS:-0}"

command -v nats-server >/dev/null 2>&1 || { echo "nats-server is not installed; run \`make deps\`" >&2; exit 1; }
"$CARGO" build --release --locked -p fhirmesh
BIN="$TARGET_DIR/release/fhirmesh"

WORK="$(mktemp -d /tmp/fhirmesh-bench-mesh.XXXXXX)"
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
  for pid in "${PIDS[@]}"; do
    wait "$pid" 2>/dev/null || true
  done
  rm -rf "$WORK"
}
trap cleanup EXIT

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

NATS_PORT="$(free_port)"
nats-server -js -a 127.0.0.1 -p "$NATS_PORT" -sd "$WORK/nats" >"$WORK/nats.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 1 100); do
  grep -q "Server is ready" "$WORK/nats.log" && break
  sleep 0.1
done
grep -q "Server is ready" "$WORK/nats.log" || { cat "$WORK/nats.log"; echo "nats-server did not start" >&2; exit 1; }

export FHIRMESH_BUS__BACKEND=nats FHIRMESH_NATS__URL="nats://127.0.0.1:$NATS_PORT" FHIRMESH_BUS__PROVISION=true
export FHIRMESH_OPS__LISTEN=127.0.0.1:0 FHIRMESH_AUTH__INSECURE_ALLOW_NONE=true RUST_LOG=warn
DATA="$WORK/data"

# Starts `fhirmesh serve ARGS…` with its log in $WORK/NAME.log; waits for PATTERN in its output
# and sets FOUND to the first capture of SED on it. Called directly, never in `$(…)`: a subshell
# would keep the PID from PIDS, and the process would outlive the script.
start() {
  local name="$1" pattern="$2" sed_expr="$3"
  shift 3
  "$BIN" serve "$@" >"$WORK/$name.log" 2>&1 &
  PIDS+=($!)
  local pid=$! found=""
  for _ in $(seq 1 200); do
    found="$(sed -n "$sed_expr" "$WORK/$name.log" | head -n1)"
    [[ -n "$found" ]] && break
    kill -0 "$pid" 2>/dev/null || { cat "$WORK/$name.log"; echo "$name exited" >&2; exit 1; }
    sleep 0.1
  done
  [[ -n "$found" ]] || { cat "$WORK/$name.log"; echo "$name did not start ($pattern)" >&2; exit 1; }
  FOUND="$found"
}

SCHEME=http
if [[ "$TLS" == 1 ]]; then
  # One CA and one certificate (127.0.0.1, server and client use) for both services.
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 -subj /CN=bench-ca \
    -keyout "$WORK/ca-key.pem" -out "$WORK/ca.pem" 2>/dev/null
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=bench -keyout "$WORK/key.pem" \
    -out "$WORK/req.pem" 2>/dev/null
  printf 'subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n' >"$WORK/ext.cnf"
  openssl x509 -req -in "$WORK/req.pem" -CA "$WORK/ca.pem" -CAkey "$WORK/ca-key.pem" -CAcreateserial -days 1 \
    -extfile "$WORK/ext.cnf" -out "$WORK/cert.pem" 2>/dev/null
  export FHIRMESH_GRPC__TLS_CA_FILE="$WORK/ca.pem" FHIRMESH_GRPC__TLS_CERT_FILE="$WORK/cert.pem" \
    FHIRMESH_GRPC__TLS_KEY_FILE="$WORK/key.pem"
  SCHEME=https
fi

FOUND=""
start resource "gRPC" 's/^fhirmesh: .*gRPC.* listening on \([0-9.:]*\).*$/\1/p' \
  --target resource --grpc-listen 127.0.0.1:0 --data-dir "$DATA"
GRPC="$FOUND"
start relay "relay" 's/^fhirmesh: \(.*relay.*\)$/\1/p' --target relay --data-dir "$DATA"
start indexer "indexer" 's/^fhirmesh: \(.*indexer.*\)$/\1/p' --target indexer --data-dir "$DATA"
start gateway "FHIR API" 's/^fhirmesh: FHIR API listening on \(http:[^ ]*\)$/\1/p' \
  --target gateway --listen 127.0.0.1:0 --resource-endpoint "$SCHEME://$GRPC"
URL="$FOUND"
echo "mesh: gateway $URL → resource $SCHEME://$GRPC; relay and indexer on nats://127.0.0.1:$NATS_PORT (work dir $WORK)"

STAMP="$(date -u +%Y%m%dT%H%M%SZ)-mesh$([[ "$TLS" == 1 ]] && echo -mtls || true)"
mkdir -p "$OUT"
"$BIN" load --url "$URL" --synthetic "$PATIENTS" --seed 1 --concurrency 2 --no-progress \
  --json "$OUT/load-$STAMP.json"
"$BIN" bench --url "$URL" --connections "$CONNECTIONS" --duration "$DURATION" \
  --patients "$BENCH_PATIENTS" --scenario "$SCENARIOS" --json "$OUT/bench-$STAMP.json" | tee "$OUT/bench-$STAMP.txt"
"$BIN" bench --url "$URL" --connections 1 --duration "$DURATION" --scenario index-lag \
  --patients 100 --no-baseline --json "$OUT/bench-$STAMP-1conn.json" | tee -a "$OUT/bench-$STAMP.txt"
echo "results: $OUT/bench-$STAMP.json, $OUT/bench-$STAMP-1conn.json, $OUT/bench-$STAMP.txt"
