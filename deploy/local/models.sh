#!/usr/bin/env bash
# Start, stop or inspect the two local llama-servers behind Triage's default config.
#
#   bash deploy/local/models.sh start [student|teacher]   # waits for /health
#   bash deploy/local/models.sh status
#   bash deploy/local/models.sh stop [student|teacher]
#
# The ports come from the gateway config (TRIAGE_CONFIG, default config.yaml), so the gateway and
# the servers cannot disagree: the student listens on the port of the first student model's first
# endpoint, the teacher stand-in on the teacher's. A role whose endpoint is not
# http://127.0.0.1:PORT (a real teacher API, say) gets no local server.
# `start` prints the names of the servers it started on stdout, one a line (up.sh stops only
# those), and stops them again when one of them fails to come up.
#
# Run deploy/local/setup.sh first. Pid files and logs: ${XDG_CACHE_HOME:-~/.cache}/triage/run.
# Environment: TRIAGE_CONFIG, TRIAGE_RUN_DIR, TRIAGE_LOCAL_CTX_SIZE, TRIAGE_LOCAL_PARALLEL,
# TRIAGE_LOCAL_THREADS, TRIAGE_LOCAL_N_PREDICT. TRIAGE_STUDENT_PORT and TRIAGE_TEACHER_PORT
# override the config's ports for tests that run the servers without the gateway; up.sh
# refuses them.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

SERVERS=(student teacher)
STARTED=()
STUDENT_PORT=""
TEACHER_PORT=""
STUDENT_ENDPOINT=""
TEACHER_ENDPOINT=""
PORT_SOURCE="$TRIAGE_CONFIG_FILE"

# Fills STUDENT_PORT/TEACHER_PORT (empty for a role that is not local) from the config.
load_ports() {
    local out role port url
    out="$(triage_config_ports)" || triage_die "cannot read the local ports from $TRIAGE_CONFIG_FILE"
    while read -r role port url; do
        [[ "$port" == - ]] && port=""
        case "$role" in
            student) STUDENT_PORT="$port" STUDENT_ENDPOINT="$url" ;;
            teacher) TEACHER_PORT="$port" TEACHER_ENDPOINT="$url" ;;
        esac
    done <<<"$out"
    if [[ -n "${TRIAGE_STUDENT_PORT:-}${TRIAGE_TEACHER_PORT:-}" ]]; then
        STUDENT_PORT="${TRIAGE_STUDENT_PORT:-$STUDENT_PORT}"
        TEACHER_PORT="${TRIAGE_TEACHER_PORT:-$TEACHER_PORT}"
        PORT_SOURCE="TRIAGE_STUDENT_PORT/TRIAGE_TEACHER_PORT"
        triage_log "ports from the environment (student ${STUDENT_PORT:-none}," \
            "teacher ${TEACHER_PORT:-none}), not from $TRIAGE_CONFIG_FILE"
    fi
}

# name -> "port model-name gguf [extra args...]"
server_spec() {
    case "$1" in
        student) echo "${STUDENT_PORT:--} $STUDENT_MODEL_NAME $STUDENT_GGUF" ;;
        teacher) echo "${TEACHER_PORT:--} $TEACHER_MODEL_NAME $TEACHER_GGUF --chat-template-file $TEACHER_TEMPLATE" ;;
    esac
}

endpoint_of() {
    case "$1" in
        student) echo "$STUDENT_ENDPOINT" ;;
        teacher) echo "$TEACHER_ENDPOINT" ;;
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

# True when something accepts TCP connections on the loopback port.
port_in_use() {
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
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
    if [[ "$port" == - ]]; then
        triage_log "not starting a local $name: its endpoint $(endpoint_of "$name") in" \
            "$TRIAGE_CONFIG_FILE is not http://127.0.0.1:PORT"
        return
    fi
    if pid="$(running_pid "$name")"; then
        triage_log "$name already running (pid $pid, http://127.0.0.1:$port/v1)"
        return
    fi
    [[ -s "$gguf" ]] || triage_die "$gguf missing: run 'bash deploy/local/setup.sh' first"
    if port_in_use "$port"; then
        triage_die "port $port, where the local $name should listen (from $PORT_SOURCE), is already" \
            "in use by another program. Free it ('ss -ltnp | grep :$port' shows which program" \
            "holds it), or give the $name a free port in the endpoints of $TRIAGE_CONFIG_FILE" \
            "(for an edited copy, run: TRIAGE_CONFIG=path/to/copy.yaml bash deploy/local/up.sh)"
    fi
    local args=(-m "$gguf" --alias "$model" --host 127.0.0.1 --port "$port"
        --ctx-size "$LOCAL_CTX_SIZE" --parallel "$LOCAL_PARALLEL" --kv-unified
        --n-predict "$LOCAL_N_PREDICT"
        --threads "$LOCAL_THREADS" --metrics --no-webui --jinja)
    # shellcheck disable=SC2206  # extra holds whitespace-free paths from common.sh
    [[ -n "$extra" ]] && args+=($extra)
    # setsid: the server outlives this shell and is out of reach of a Ctrl-C meant for the
    # gateway in up.sh, which stops it itself.
    setsid "$LLAMA_SERVER_BIN" "${args[@]}" >"$log" 2>&1 </dev/null &
    echo $! >"$RUN_DIR/$name.pid"
    STARTED+=("$name")
    triage_log "started $name ($model) pid $! on http://127.0.0.1:$port/v1, log $log"
}

wait_healthy() {
    local name="$1" port deadline
    read -r port _ <<<"$(server_spec "$name")"
    [[ "$port" == - ]] && return
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
        [[ "$port" != - ]] && http_ok "http://127.0.0.1:$port/health" && health=healthy
        rss="$(awk '/^VmRSS/ {printf "%d MiB", $2 / 1024}' "/proc/$pid/status")"
        printf '%-8s running  pid %-7s %-9s http://127.0.0.1:%s/v1  model %-22s rss %s\n' \
            "$name" "$pid" "$health" "$port" "$model" "$rss"
    elif [[ "$port" == - ]]; then
        printf '%-8s not local (%s)\n' "$name" "$(endpoint_of "$name")"
    else
        printf '%-8s stopped\n' "$name"
        return 1
    fi
}

# A failed start leaves nothing behind: stop what this invocation started.
rollback() {
    local rc=$?
    if ((rc != 0 && ${#STARTED[@]} > 0)); then
        triage_log "start failed; stopping what it started: ${STARTED[*]}"
        for s in "${STARTED[@]}"; do stop_one "$s" || true; done
    fi
    return "$rc"
}

main() {
    local cmd="${1:-}" rc=0 s names=()
    [[ $# -gt 0 ]] && shift
    for s in "$@"; do
        [[ " ${SERVERS[*]} " == *" $s "* ]] || triage_die "unknown server '$s' (expected: ${SERVERS[*]})"
        names+=("$s")
    done
    [[ ${#names[@]} -gt 0 ]] || names=("${SERVERS[@]}")
    mkdir -p "$RUN_DIR"
    case "$cmd" in
        start)
            [[ -x "$LLAMA_SERVER_BIN" ]] || triage_die "$LLAMA_SERVER_BIN missing: run 'bash deploy/local/setup.sh' first"
            load_ports
            trap rollback EXIT
            for s in "${names[@]}"; do start_one "$s"; done
            for s in "${names[@]}"; do wait_healthy "$s"; done
            trap - EXIT
            [[ ${#STARTED[@]} -eq 0 ]] || printf '%s\n' "${STARTED[@]}"
            ;;
        stop) for s in "${names[@]}"; do stop_one "$s"; done ;;
        status)
            load_ports
            for s in "${names[@]}"; do status_one "$s" || rc=1; done
            ;;
        *)
            echo "usage: $0 start|stop|status [student|teacher]" >&2
            return 2
            ;;
    esac
    return "$rc"
}

main "$@"
