#!/usr/bin/env bash
# Runs the Go interop checker (ttrpc-interop, containerd's ttrpc.Client) against
# arbiter-echo twice: once without authentication and once with
# --auth-token-file (-expect-auth). Exits non-zero when any check fails.
#
# Environment:
#   ARBITER_ECHO_BIN  arbiter-echo binary (default .build/debug/arbiter-echo)
#   SKIP_GO_BUILD=1   use the existing .build-go/bin/ttrpc-interop
#   INTEROP_ARGS      extra arguments for ttrpc-interop (e.g. "-run deadline")
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ECHO_BIN="${ARBITER_ECHO_BIN:-$ROOT/.build/debug/arbiter-echo}"
BIN="$ROOT/.build-go/bin"

if [ ! -x "$ECHO_BIN" ]; then
    echo "interop-go: arbiter-echo not found at $ECHO_BIN" >&2
    echo "  build it (swift build --product arbiter-echo) or set ARBITER_ECHO_BIN" >&2
    exit 1
fi
if [ "${SKIP_GO_BUILD:-0}" != 1 ]; then
    "$ROOT/scripts/build-go-examples.sh" >/dev/null
fi
[ -x "$BIN/ttrpc-interop" ] || { echo "interop-go: $BIN/ttrpc-interop missing" >&2; exit 1; }

SCRIPT=interop-go
. "$ROOT/scripts/lib.sh"

WORK="$(mktemp -d "${TMPDIR:-/tmp}/interop-go.XXXXXX")"
PIDS=()
trap stop_all EXIT
trap 'exit 130' INT TERM

TOKEN="interop-$RANDOM$RANDOM"
printf '%s\n' "$TOKEN" >"$WORK/token"

# Server 1: no auth.
free_port P1; free_port A1
"$ECHO_BIN" --host 127.0.0.1 --port "$P1" --admin-port "$A1" --data-dir "$WORK/data-open" \
    >"$WORK/arbiter-echo-open.log" 2>&1 &
PIDS+=($!); PID1=$!
# Server 2: --auth-token-file.
free_port P2; free_port A2
"$ECHO_BIN" --host 127.0.0.1 --port "$P2" --admin-port "$A2" --data-dir "$WORK/data-auth" \
    --auth-token-file "$WORK/token" >"$WORK/arbiter-echo-auth.log" 2>&1 &
PIDS+=($!); PID2=$!

wait_accept "$P1" "$PID1" arbiter-echo-open
wait_accept "$P2" "$PID2" arbiter-echo-auth

status=0
echo "== arbiter-echo without auth (127.0.0.1:$P1)"
# shellcheck disable=SC2086
"$BIN/ttrpc-interop" -addr "127.0.0.1:$P1" ${INTEROP_ARGS:-} || status=1
echo
echo "== arbiter-echo with --auth-token-file (127.0.0.1:$P2)"
# shellcheck disable=SC2086
"$BIN/ttrpc-interop" -addr "127.0.0.1:$P2" -token "$TOKEN" -expect-auth ${INTEROP_ARGS:-} || status=1

for pid in "$PID1" "$PID2"; do
    if ! kill -0 "$pid" 2>/dev/null; then
        echo "interop-go: an arbiter-echo process died during the checks" >&2
        status=1
    fi
done
if [ $status -ne 0 ]; then echo "interop-go: FAILED" >&2; else echo "interop-go: all checks passed"; fi
exit $status
