#!/usr/bin/env bash
# Benchmarks the arbiter-identity process with a million identifiers stored: Resolve of
# known identifiers and Link (known email + new device), driven over loopback by
# containerd's Go ttrpc client (ttrpc-bench) from another process. Prints figures and the
# server's memory before and after.
#   IDENTIFIERS (default 1000000)  CONNS (16)  CONCURRENCY (8)  DURATION (10s)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
IDENTIFIERS="${IDENTIFIERS:-1000000}"; CONNS="${CONNS:-16}"; CONCURRENCY="${CONCURRENCY:-8}"; DURATION="${DURATION:-10s}"
SCRIPT=bench-identity
. "$ROOT/scripts/lib.sh"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/bench-identity.XXXXXX")"
PIDS=()
trap stop_all EXIT
trap 'exit 130' INT TERM

cd "$ROOT"
swift build -c release --product arbiter-bench >/dev/null
swift build -c release --product arbiter-identity >/dev/null
[ "${SKIP_GO_BUILD:-0}" = 1 ] || scripts/build-go-examples.sh >/dev/null
.build/release/arbiter-bench identity --identifiers "$IDENTIFIERS" --data-dir "$WORK/data" --seed-only
free_port P; free_port A
.build/release/arbiter-identity --port "$P" --admin-port "$A" --data-dir "$WORK/data" --log-level warning >"$WORK/identity.log" 2>&1 &
PIDS+=($!); SERVER=$!
wait_accept "$P" "$SERVER" identity
rss() { awk '/VmRSS/ {print int($2/1024) " MiB"}' "/proc/$SERVER/status"; }
echo "arbiter-identity rss at start: $(rss)"
for method in resolve link; do
  printf '%-8s ' "$method"
  .build-go/bin/ttrpc-bench -addr "127.0.0.1:$P" -method "$method" -persons $((IDENTIFIERS / 2)) \
    -conns "$CONNS" -concurrency "$CONCURRENCY" -duration "$DURATION"
done
echo "arbiter-identity rss after: $(rss)"
