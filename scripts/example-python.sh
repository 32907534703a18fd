#!/usr/bin/env bash
# Runs the Python integrator example (examples/python/example.py --check) against
# arbiter-echo: once on a server without auth, then on one started with
# --auth-token-file (with the token, and without it). Exits non-zero when a check fails.
#   ARBITER_ECHO_BIN  the arbiter-echo binary (default .build/debug/arbiter-echo)
#   PYTHON            a Python 3 with the protobuf module (default /usr/bin/python3)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ECHO_BIN="${ARBITER_ECHO_BIN:-$ROOT/.build/debug/arbiter-echo}"
PYTHON="${PYTHON:-/usr/bin/python3}"
SCRIPT=example-python
[ -x "$ECHO_BIN" ] || { echo "$SCRIPT: arbiter-echo not found at $ECHO_BIN (swift build --product arbiter-echo)" >&2; exit 1; }
"$PYTHON" -c 'import google.protobuf' 2>/dev/null \
  || { echo "$SCRIPT: $PYTHON has no protobuf module (apt-get install python3-protobuf)" >&2; exit 1; }
. "$ROOT/scripts/lib.sh"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/example-python.XXXXXX")"
PIDS=()
trap stop_all EXIT
trap 'exit 130' INT TERM

TOKEN="py-$RANDOM$RANDOM"
printf '%s\n' "$TOKEN" >"$WORK/token"   # the server trims the file's content
free_port P1; free_port A1; free_port P2; free_port A2
"$ECHO_BIN" --host 127.0.0.1 --port "$P1" --admin-port "$A1" --data-dir "$WORK/open" \
  >"$WORK/echo-open.log" 2>&1 &
PIDS+=($!); wait_accept "$P1" $! echo-open
"$ECHO_BIN" --host 127.0.0.1 --port "$P2" --admin-port "$A2" --data-dir "$WORK/auth" --auth-token-file "$WORK/token" \
  >"$WORK/echo-auth.log" 2>&1 &
PIDS+=($!); wait_accept "$P2" $! echo-auth

failed=()
run() {  # run NAME LOG ARGS...: one example.py --check run; remembers a failure, shows the server log
  local name=$1 log=$2; shift 2
  echo
  echo "== $name"
  if ! "$PYTHON" "$ROOT/examples/python/example.py" --check "$@"; then
    failed+=("$name")
    echo "-- $SCRIPT: '$name' failed; last lines of the server log:" >&2
    tail -n 20 "$WORK/$log.log" >&2 || true
  fi
}
run "arbiter-echo without auth" echo-open --addr "127.0.0.1:$P1"
run "arbiter-echo with --auth-token-file, with the token" echo-auth --addr "127.0.0.1:$P2" --token "$TOKEN" --expect-auth
run "arbiter-echo with --auth-token-file, without a token" echo-auth --addr "127.0.0.1:$P2" --expect-auth

echo
if [ ${#failed[@]} -gt 0 ]; then
  echo "$SCRIPT: FAILED: ${failed[*]}" >&2
  exit 1
fi
echo "$SCRIPT: all runs passed"
