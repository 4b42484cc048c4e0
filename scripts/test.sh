#!/usr/bin/env bash
# The test command (the README's, and CI's): install, make sure Redis answers, lint, type-check, test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
venv=${INFERQ_VENV:-.venv}
# Tests use Redis on 127.0.0.1:6379 (database 13, flushed before and after). Start one if none answers.
if ! "$venv/bin/python" -c "import redis; redis.Redis(socket_connect_timeout=1).ping()" 2>/dev/null; then
  if ! command -v redis-server >/dev/null; then
    apt-get update -qq && apt-get install -y -qq redis-server >/dev/null
  fi
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no
  for _ in $(seq 50); do "$venv/bin/python" -c "import redis; redis.Redis().ping()" 2>/dev/null && break; sleep 0.1; done
fi
# System tools the deployment and monitoring tests run (Debian packages): docker-compose validates the compose
# file, promtool/prometheus check and run the scrape config and dashboard queries, chromium screenshots Flower,
# curl reads the gateway's event stream as the README shows.
missing=()
for pair in docker-compose:docker-compose promtool:prometheus chromium:chromium openssl:openssl curl:curl; do
  command -v "${pair%%:*}" >/dev/null || missing+=("${pair##*:}")
done
if ((${#missing[@]})); then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
"$venv/bin/ruff" check .
"$venv/bin/mypy"
HF_HUB_OFFLINE=1 "$venv/bin/python" -m pytest "$@"
