#!/usr/bin/env bash
# Benchmarks grpc.health.v1.Health/Check on an Arbiter server (arbiter-echo)
# against containerd's Go ttrpc server (ttrpc-refserver), both driven by the
# same Go load client (ttrpc-bench, containerd's ttrpc.Client), at 1, 16 and
# 64 connections. Prints a table; stops both servers on exit.
#
# Environment:
#   ARBITER_ECHO_BIN  arbiter-echo binary (default .build/release/arbiter-echo)
#   CONNS             connection counts to run (default "1 16 64")
#   CONCURRENCY       outstanding calls per connection (default 8)
#   DURATION          measurement per run (default 5s)
#   WARMUP            warm-up per run (default 1s)
#   SKIP_GO_BUILD=1   use the existing .build-go/bin binaries
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ECHO_BIN="${ARBITER_ECHO_BIN:-$ROOT/.build/release/arbiter-echo}"
CONNS="${CONNS:-1 16 64}"
CONCURRENCY="${CONCURRENCY:-8}"
DURATION="${DURATION:-5s}"
WARMUP="${WARMUP:-1s}"
BIN="$ROOT/.build-go/bin"

if [ ! -x "$ECHO_BIN" ]; then
    echo "bench-rpc: arbiter-echo not found at $ECHO_BIN" >&2
    echo "  build it (swift build -c release --product arbiter-echo) or set ARBITER_ECHO_BIN" >&2
    exit 1
fi
if [ "${SKIP_GO_BUILD:-0}" != 1 ]; then
    "$ROOT/scripts/build-go-examples.sh" >/dev/null
fi
for b in ttrpc-bench ttrpc-refserver; do
    [ -x "$BIN/$b" ] || { echo "bench-rpc: $BIN/$b missing (run scripts/build-go-examples.sh)" >&2; exit 1; }
done

SCRIPT=bench-rpc
. "$ROOT/scripts/lib.sh"

WORK="$(mktemp -d "${TMPDIR:-/tmp}/bench-rpc.XXXXXX")"
PIDS=()
trap stop_all EXIT
trap 'exit 130' INT TERM

free_port RPC_PORT
free_port ADMIN_PORT
free_port REF_PORT

"$ECHO_BIN" --host 127.0.0.1 --port "$RPC_PORT" --admin-port "$ADMIN_PORT" \
    --data-dir "$WORK/data" --log-level warning >"$WORK/arbiter-echo.log" 2>&1 &
PIDS+=($!)
ECHO_PID=$!
"$BIN/ttrpc-refserver" -addr "127.0.0.1:$REF_PORT" >"$WORK/ttrpc-refserver.log" 2>&1 &
PIDS+=($!)
REF_PID=$!

wait_accept "$RPC_PORT" "$ECHO_PID" arbiter-echo
wait_accept "$REF_PORT" "$REF_PID" ttrpc-refserver

echo "# Health/Check closed loop: concurrency=$CONCURRENCY per connection, duration=$DURATION, warmup=$WARMUP"
echo "# arbiter-echo: $ECHO_BIN on :$RPC_PORT; go-ttrpc: ttrpc-refserver (containerd ttrpc 1.1.1) on :$REF_PORT"
printf '%-14s %6s %6s %10s %14s %10s %10s %7s\n' server conns conc calls "throughput/s" "p50(us)" "p99(us)" errors
status=0
for target in arbiter-echo go-ttrpc; do
    if [ "$target" = arbiter-echo ]; then port=$RPC_PORT; else port=$REF_PORT; fi
    for n in $CONNS; do
        if ! line=$("$BIN/ttrpc-bench" -addr "127.0.0.1:$port" -conns "$n" -concurrency "$CONCURRENCY" \
                    -duration "$DURATION" -warmup "$WARMUP" 2>"$WORK/bench.err"); then
            echo "bench-rpc: ttrpc-bench against $target with $n connections failed: $(cat "$WORK/bench.err")" >&2
            status=1
            continue
        fi
        echo "$line" | awk -v t="$target" -v c="$CONCURRENCY" '{
            for (i = 1; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] }
            sub(/\/s$/, "", v["throughput"]); sub(/us$/, "", v["p50"]); sub(/us$/, "", v["p99"])
            printf "%-14s %6s %6s %10s %14s %10s %10s %7s\n", t, v["conns"], c, v["calls"], v["throughput"], v["p50"], v["p99"], v["errors"]
        }'
        if [ -s "$WORK/bench.err" ]; then sed 's/^/#   /' "$WORK/bench.err"; fi
    done
done
exit $status
