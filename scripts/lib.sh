# Shell helpers shared by the scripts that start servers (source it; set SCRIPT, WORK, PIDS first).

# free_port VAR: sets VAR to a TCP port in 17300-17999 that nothing listens on and that this
# script has not taken yet. It sets a variable rather than printing, because $(free_port)
# would run in a subshell that forgets what it took (two calls could return the same port).
TAKEN=" "
free_port() {
    local p tries=0
    while [ $tries -lt 200 ]; do
        p=$(( 17300 + RANDOM % 700 ))
        tries=$((tries + 1))
        case "$TAKEN" in *" $p "*) continue ;; esac
        if [ -z "$(ss -Htln "sport = :$p" 2>/dev/null)" ]; then
            TAKEN="$TAKEN$p "
            printf -v "$1" '%s' "$p"
            return 0
        fi
    done
    echo "$SCRIPT: no free port found" >&2
    return 1
}

# wait_accept PORT PID NAME: wait until 127.0.0.1:PORT accepts, while PID lives; its log is $WORK/NAME.log.
wait_accept() {
    local port=$1 pid=$2 name=$3 i
    for i in $(seq 1 150); do
        if ! kill -0 "$pid" 2>/dev/null; then
            echo "$SCRIPT: $name exited before accepting connections; log:" >&2
            cat "$WORK/$name.log" >&2 || true
            return 1
        fi
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            return 0
        fi
        sleep 0.1
    done
    echo "$SCRIPT: $name did not accept on port $port within 15s" >&2
    return 1
}

# stop_all: stop every process in PIDS and remove WORK (use as the EXIT trap).
stop_all() {
    local pid
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    rm -rf "$WORK"
}
