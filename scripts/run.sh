#!/usr/bin/env bash
# Setup and run: installs what is missing (apt packages included), builds, starts
# the suite on localhost with every store under one data directory, waits until
# every service is ready, runs the demo (`arbiter demo`: a synthetic population through
# the real services, with a report in the terminal and in $ARBITER_DATA/demo.html) and
# a Python client over the wire, and keeps running until Ctrl-C, which stops every
# service gracefully. Settings: examples/arbiter.json (per-segment learning, a 10 %
# holdout, deliveries to a local webhook receiver, scripts/webhook-sink.py).
#
# Environment: ARBITER_DATA (default ./data), ARBITER_BUILD (debug or release, default release).
set -euo pipefail
cd "$(dirname "$0")/.."
data="${ARBITER_DATA:-./data}"
config="${ARBITER_BUILD:-release}"

scripts/install-deps.sh
echo "== building ($config)"
swift build -c "$config"
bin=".build/$config"
mkdir -p "$data"

for port in 7100 7101 7102 7103 7104 7199 8100 8101 8102 8103 8104; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    echo "run: port $port is already in use; stop what listens there (ss -ltnp 'sport = :$port')" >&2
    exit 1
  fi
done

pids=()
stop() {
  echo
  echo "== stopping (SIGTERM: each service drains its in-flight calls)"
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
}
trap stop EXIT
trap 'exit 0' INT TERM

# The four services: `arbiter up` starts them wired together, waits until they serve,
# prints their addresses, and stops them gracefully on Ctrl-C.
"$bin/arbiter" up --data-dir "$data" --config examples/arbiter.json &
pids+=($!)
# Where routing delivers (push, in-app, webhook and email go to its webhook adapter).
# Each helper stops by itself once this script is gone, even after a kill -9 of it (as
# `arbiter up` stops its services): a next run finds the ports free.
/usr/bin/python3 scripts/webhook-sink.py --port 7199 --log "$data/webhook-deliveries.jsonl" --parent-pid $$ >/dev/null &
pids+=($!)
# The conformance server for client authors (the Python demo talks to it).
"$bin/arbiter-echo" --port 7100 --admin-port 8100 --data-dir "$data/echo" --parent-pid $$ >>"$data/echo.log" 2>&1 &
pids+=($!)

for admin in 8101 8102 8104 8103 8100; do
  for _ in $(seq 1 300); do
    curl -sf "http://127.0.0.1:$admin/readyz" >/dev/null && break
    kill -0 "${pids[0]}" 2>/dev/null || { echo "arbiter up failed (see above)" >&2; exit 1; }
    sleep 0.1
  done
  curl -sf "http://127.0.0.1:$admin/readyz" >/dev/null || { echo "service with admin port $admin did not become ready; see $data/*.log" >&2; exit 1; }
done
echo "echo       127.0.0.1:7100       http://127.0.0.1:8100                     $data/echo.log"

echo
echo "== demo: a synthetic population through the suite (arbiter demo)"
"$bin/arbiter" demo --html "$data/demo.html" || echo "the demo failed (see above); the suite keeps running" >&2

echo
echo "== a Python client speaking ttrpc to the suite (examples/python)"
if [ -f examples/python/example.py ]; then
  /usr/bin/python3 examples/python/example.py --addr 127.0.0.1:7100 || true
fi
for port in 7101 7102 7103 7104; do
  /usr/bin/python3 examples/python/example.py --addr "127.0.0.1:$port" --health-only 2>/dev/null || true
done

echo
echo "running; Ctrl-C stops the suite"
wait "${pids[0]}"
