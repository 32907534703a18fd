#!/usr/bin/env bash
# Setup and run: installs what is missing (apt packages included), builds, starts
# the suite on localhost with every store under one data directory, waits until
# every service is ready, runs a short demo over the wire, and keeps running until
# Ctrl-C, which stops every service gracefully.
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

for port in 7100 7101 7102 7103 7104 8100 8101 8102 8103 8104; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    echo "run: port $port is already in use; stop what listens there (ss -ltnp 'sport = :$port')" >&2
    exit 1
  fi
done

pids=()
names=()
stop() {
  echo
  echo "== stopping (SIGTERM: each service drains its in-flight calls)"
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  echo "stopped"
}
trap stop EXIT
trap 'exit 0' INT TERM

# name port admin-port extra-flags...
start() {
  local name=$1 port=$2 admin=$3; shift 3
  "$bin/arbiter-$name" --port "$port" --admin-port "$admin" --data-dir "$data/$name" "$@" \
    >>"$data/$name.log" 2>&1 &
  pids+=($!)
  names+=("$name")
}
start identity 7101 8101
start profile  7102 8102 --identity 127.0.0.1:7101
start routing  7104 8104 --identity 127.0.0.1:7101 --profile 127.0.0.1:7102
start decision 7103 8103 --identity 127.0.0.1:7101 --profile 127.0.0.1:7102 --routing 127.0.0.1:7104
start echo     7100 8100

echo "== waiting for readiness"
for admin in 8101 8102 8104 8103 8100; do
  for _ in $(seq 1 100); do
    curl -sf "http://127.0.0.1:$admin/readyz" >/dev/null && break
    sleep 0.1
  done
  curl -sf "http://127.0.0.1:$admin/readyz" >/dev/null || { echo "service with admin port $admin did not become ready; see $data/*.log" >&2; exit 1; }
done
for i in "${!pids[@]}"; do
  kill -0 "${pids[$i]}" 2>/dev/null || { echo "arbiter-${names[$i]} exited; its log:" >&2; tail -20 "$data/${names[$i]}.log" >&2; exit 1; }
done
cat <<TABLE
service    rpc (ttrpc)       admin (HTTP)                    log
identity   127.0.0.1:7101    http://127.0.0.1:8101/metrics   $data/identity.log
profile    127.0.0.1:7102    http://127.0.0.1:8102/metrics   $data/profile.log
decision   127.0.0.1:7103    http://127.0.0.1:8103/metrics   $data/decision.log
routing    127.0.0.1:7104    http://127.0.0.1:8104/metrics   $data/routing.log
echo       127.0.0.1:7100    http://127.0.0.1:8100/metrics   $data/echo.log
TABLE

echo
echo "== demo: a Python client speaking ttrpc to the suite (examples/python)"
if [ -f examples/python/example.py ]; then
  /usr/bin/python3 examples/python/example.py --addr 127.0.0.1:7100 || true
fi
for port in 7101 7102 7103 7104; do
  /usr/bin/python3 examples/python/example.py --addr "127.0.0.1:$port" --health-only 2>/dev/null || true
done

echo
echo "running; Ctrl-C stops the suite"
wait
