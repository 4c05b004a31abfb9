#!/usr/bin/env bash
# Start, stop or inspect the two local llama-servers behind Triage's default config.
#
#   bash deploy/local/models.sh start    # student :8001, teacher stand-in :8002; waits for /health
#   bash deploy/local/models.sh status
#   bash deploy/local/models.sh stop
#
# Run deploy/local/setup.sh first. Pid files and logs: ${XDG_CACHE_HOME:-~/.cache}/triage/run.
# Environment overrides (used by tests/deploy): TRIAGE_STUDENT_PORT, TRIAGE_TEACHER_PORT,
# TRIAGE_RUN_DIR, TRIAGE_LOCAL_CTX_SIZE, TRIAGE_LOCAL_PARALLEL, TRIAGE_LOCAL_THREADS.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

SERVERS=(student teacher)

# name -> "port model-name gguf [extra args...]"
server_spec() {
    case "$1" in
        student) echo "$STUDENT_PORT $STUDENT_MODEL_NAME $STUDENT_GGUF" ;;
        teacher) echo "$TEACHER_PORT $TEACHER_MODEL_NAME $TEACHER_GGUF --chat-template-file $TEACHER_TEMPLATE" ;;
    esac
}

http_ok() {
    if command -v curl >/dev/null; then
        curl -fsS --max-time 2 -o /dev/null "$1" 2>/dev/null
    else
        "$(triage_python)" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)' \
            "$1" 2>/dev/null
    fi
}

# Prints the pid when the pid file names a live llama-server (not a recycled pid).
running_pid() {
    local pidfile="$RUN_DIR/$1.pid" pid
    [[ -f "$pidfile" ]] || return 1
    pid="$(cat "$pidfile")"
    [[ -n "$pid" && -r "/proc/$pid/cmdline" ]] || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q llama-server || return 1
    echo "$pid"
}

start_one() {
    local name="$1" port model gguf extra pid log
    read -r port model gguf extra <<<"$(server_spec "$name")"
    log="$RUN_DIR/$name.log"
    if pid="$(running_pid "$name")"; then
        triage_log "$name already running (pid $pid, http://127.0.0.1:$port/v1)"
        return
    fi
    [[ -s "$gguf" ]] || triage_die "$gguf missing: run 'bash deploy/local/setup.sh' first"
    if http_ok "http://127.0.0.1:$port/health"; then
        triage_die "port $port is already serving something else; stop it or set TRIAGE_${name^^}_PORT"
    fi
    local args=(-m "$gguf" --alias "$model" --host 127.0.0.1 --port "$port"
        --ctx-size "$LOCAL_CTX_SIZE" --parallel "$LOCAL_PARALLEL" --kv-unified
        --threads "$LOCAL_THREADS" --metrics --no-webui --jinja)
    # shellcheck disable=SC2206  # extra holds whitespace-free paths from common.sh
    [[ -n "$extra" ]] && args+=($extra)
    # setsid: the server outlives this shell (up.sh execs the gateway afterwards).
    setsid "$LLAMA_SERVER_BIN" "${args[@]}" >"$log" 2>&1 </dev/null &
    echo $! >"$RUN_DIR/$name.pid"
    triage_log "started $name ($model) pid $! on http://127.0.0.1:$port/v1, log $log"
}

wait_healthy() {
    local name="$1" port deadline
    read -r port _ <<<"$(server_spec "$name")"
    deadline=$((SECONDS + HEALTH_TIMEOUT_S))
    until http_ok "http://127.0.0.1:$port/health"; do
        if ! running_pid "$name" >/dev/null; then
            tail -n 20 "$RUN_DIR/$name.log" >&2 || true
            triage_die "$name exited during startup; log: $RUN_DIR/$name.log"
        fi
        ((SECONDS < deadline)) || triage_die "$name not healthy after ${HEALTH_TIMEOUT_S}s; log: $RUN_DIR/$name.log"
        sleep 0.5
    done
    triage_log "$name healthy on :$port"
}

stop_one() {
    local name="$1" pid
    if ! pid="$(running_pid "$name")"; then
        triage_log "$name not running"
        rm -f "$RUN_DIR/$name.pid"
        return
    fi
    kill "$pid"
    for _ in $(seq 50); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.2
    done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
    rm -f "$RUN_DIR/$name.pid"
    triage_log "stopped $name (pid $pid)"
}

status_one() {
    local name="$1" port model pid rss health=unhealthy
    read -r port model _ <<<"$(server_spec "$name")"
    if pid="$(running_pid "$name")"; then
        http_ok "http://127.0.0.1:$port/health" && health=healthy
        rss="$(awk '/^VmRSS/ {printf "%d MiB", $2 / 1024}' "/proc/$pid/status")"
        printf '%-8s running  pid %-7s %-9s http://127.0.0.1:%s/v1  model %-22s rss %s\n' \
            "$name" "$pid" "$health" "$port" "$model" "$rss"
    else
        printf '%-8s stopped\n' "$name"
        return 1
    fi
}

main() {
    local cmd="${1:-}" rc=0
    mkdir -p "$RUN_DIR"
    case "$cmd" in
        start)
            [[ -x "$LLAMA_SERVER_BIN" ]] || triage_die "$LLAMA_SERVER_BIN missing: run 'bash deploy/local/setup.sh' first"
            for s in "${SERVERS[@]}"; do start_one "$s"; done
            for s in "${SERVERS[@]}"; do wait_healthy "$s"; done
            ;;
        stop) for s in "${SERVERS[@]}"; do stop_one "$s"; done ;;
        status) for s in "${SERVERS[@]}"; do status_one "$s" || rc=1; done ;;
        *)
            echo "usage: $0 start|stop|status" >&2
            return 2
            ;;
    esac
    return "$rc"
}

main "$@"
