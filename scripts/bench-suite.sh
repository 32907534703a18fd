#!/usr/bin/env bash
# Benchmarks the decision service as deployed: the four services as separate release
# processes (`arbiter up`) and the load generator (`arbiter load`) on this machine.
# Seeds PERSONS persons (traits and consent) through the profile service and ACTIONS
# actions, then drives Decide (with 10 % ReportOutcome) open loop at RATE/s for DURATION
# seconds after a warm-up, and prints the figures and where the CPU went (per process).
#   PERSONS (100000)  ACTIONS (50)  RATE (3000)  DURATION (60)  WARMUP (5)  CONCURRENCY (256)
#   CAPS (unset; 1: each action capped at 3 offers a week per person, 20 a day per person)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PERSONS="${PERSONS:-100000}"; ACTIONS="${ACTIONS:-50}"; RATE="${RATE:-3000}"; DURATION="${DURATION:-60}"
WARMUP="${WARMUP:-5}"; CONCURRENCY="${CONCURRENCY:-256}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/bench-suite.XXXXXX")"
cd "$ROOT"
swift build -c release --product arbiter >/dev/null
for s in identity profile decision routing; do swift build -c release --product "arbiter-$s" >/dev/null; done
bin=.build/release
"$bin/arbiter" up --data-dir "$WORK" --port-base 17400 --admin-port-base 17500 --log-level warning &
UP=$!
trap 'kill -TERM $UP 2>/dev/null; wait $UP 2>/dev/null; rm -rf "$WORK"' EXIT
for port in 17501 17502 17503 17504; do
  for _ in $(seq 1 300); do curl -sf "http://127.0.0.1:$port/readyz" >/dev/null && break; sleep 0.1; done
done
cpu() { for s in identity profile decision routing; do
  pid=$(pgrep -f "arbiter-$s .*--port 1740" | head -1)
  printf '%s=%s ' "$s" "$(awk '{print $14 + $15}' "/proc/$pid/stat")"; done; echo; }
"$bin/arbiter" load --address 127.0.0.1:17403 --seed-profile 127.0.0.1:17402 --persons "$PERSONS" --actions "$ACTIONS" \
  ${CAPS:+--caps} --seed-only
echo "CPU ticks (1/100 s) before: $(cpu)"
"$bin/arbiter" load --address 127.0.0.1:17403 --persons "$PERSONS" --rate "$RATE" --duration "$DURATION" --warmup "$WARMUP" \
  --concurrency "$CONCURRENCY" --json "$ROOT/.build/bench-suite.json" --hdr "$ROOT/.build/bench-suite.hgrm"
echo "CPU ticks (1/100 s) after:  $(cpu)"
