#!/usr/bin/env bash
# Runs the Python integrator example (examples/python) with --check against arbiter-echo,
# once without and once with --auth-token-file. Exits non-zero when a check fails.
#   ARBITER_ECHO_BIN  arbiter-echo binary (default .build/debug/arbiter-echo)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ECHO_BIN="${ARBITER_ECHO_BIN:-$ROOT/.build/debug/arbiter-echo}"
[ -x "$ECHO_BIN" ] || { echo "example-python: arbiter-echo not found at $ECHO_BIN" >&2; exit 1; }
SCRIPT=example-python
. "$ROOT/scripts/lib.sh"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/example-python.XXXXXX")"
PIDS=()
trap stop_all EXIT
trap 'exit 130' INT TERM

TOKEN="py-$RANDOM$RANDOM"
printf '%s\n' "$TOKEN" >"$WORK/token"
P1=$(free_port); A1=$(free_port); P2=$(free_port); A2=$(free_port)
"$ECHO_BIN" --port "$P1" --admin-port "$A1" --data-dir "$WORK/open" >"$WORK/echo-open.log" 2>&1 &
PIDS+=($!); wait_accept "$P1" $! echo-open
"$ECHO_BIN" --port "$P2" --admin-port "$A2" --data-dir "$WORK/auth" --auth-token-file "$WORK/token" >"$WORK/echo-auth.log" 2>&1 &
PIDS+=($!); wait_accept "$P2" $! echo-auth

echo "== Python example against arbiter-echo"
/usr/bin/python3 "$ROOT/examples/python/example.py" --addr "127.0.0.1:$P1" --check
echo "== Python example against arbiter-echo with --auth-token-file"
/usr/bin/python3 "$ROOT/examples/python/example.py" --addr "127.0.0.1:$P2" --token "$TOKEN" --check --expect-auth
