#!/usr/bin/env bash
# One command from a fresh clone to a working gateway on CPU:
#   bash deploy/local/up.sh [extra `triage serve` args]
# 1. setup.sh   - preflight, then build llama-server and fetch the models (cached; ~6 min the
#                 first time on 2 idle cores)
# 2. models.sh  - start the student and teacher stand-in in the background, on the ports of their
#                 endpoints in the config (TRIAGE_CONFIG, default config.yaml)
# 3. `triage serve --config <that config>` in the foreground.
#
# Ctrl-C (or SIGTERM to this script) stops the gateway, which finishes the requests in flight, and
# then the models this run started. When the gateway exits by itself (it failed to start, say),
# the models this run started are stopped too. Models that were already running before this run
# are left running; `bash deploy/local/models.sh stop` stops them.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

for var in TRIAGE_STUDENT_PORT TRIAGE_TEACHER_PORT; do
    [[ -z "${!var:-}" ]] || triage_die "$var is set, but up.sh takes the model ports from the" \
        "endpoints in $TRIAGE_CONFIG_FILE (so the gateway and the models agree): unset it and edit" \
        "that file instead"
done
triage="$(triage_cli)" ||
    triage_die "the triage CLI is not installed: python3 -m venv .venv && .venv/bin/pip install -e ."
config="$TRIAGE_CONFIG_FILE"
# A bad config (exit 2) or a broken install fails here, in a second, not after the build.
rc=0
"$triage" check-config "$config" >/dev/null || rc=$?
case "$rc" in
    0) ;;
    2) triage_die "fix $config first (the errors are above)" ;;
    *) triage_die "$triage does not run (the error is above): reinstall with .venv/bin/pip install -e ." ;;
esac

bash "$TRIAGE_LOCAL_DIR/setup.sh"

# The gateway's own port, unless the caller chose another one: a clash fails now, before the
# models start.
if [[ " $* " != *" --port"* ]]; then
    gateway_port="$(triage_config_ports | awk '$1 == "gateway" {print $2}')"
    if (exec 3<>"/dev/tcp/127.0.0.1/$gateway_port") 2>/dev/null; then
        triage_die "port $gateway_port, where the gateway should listen (server.port in $config), is" \
            "already in use: stop what holds it ('ss -ltnp | grep :$gateway_port'), change" \
            "server.port in that file, or pass --port N to up.sh"
    fi
fi

started=()
gateway_pid=""
stopping=0

# Runs on every exit: stop the models this run started, and say what is left.
# shellcheck disable=SC2317  # called by the EXIT trap
cleanup() {
    local rc=$? name left=()
    # A second Ctrl-C must not cut the teardown short (models.sh inherits the ignore).
    trap '' INT
    trap - EXIT TERM
    if [[ -n "$gateway_pid" ]] && kill -0 "$gateway_pid" 2>/dev/null; then
        kill -TERM "$gateway_pid" 2>/dev/null || true
        wait "$gateway_pid" 2>/dev/null || true
    fi
    if ((${#started[@]} > 0)); then
        triage_log "stopping the models this run started: ${started[*]}"
        bash "$TRIAGE_LOCAL_DIR/models.sh" stop "${started[@]}" || true
    fi
    for name in student teacher; do
        [[ " ${started[*]} " == *" $name "* ]] && continue
        [[ -f "$RUN_DIR/$name.pid" ]] && left+=("$name")
    done
    if ((${#left[@]} > 0)); then
        triage_log "still running from before this run: ${left[*]}; to stop:" \
            "bash deploy/local/models.sh stop"
    fi
    exit "$rc"
}

# Ctrl-C reaches the gateway from the terminal too; SIGTERM to this script does not, so pass it
# on. uvicorn treats a SIGTERM after a SIGINT as the same graceful stop.
# shellcheck disable=SC2317  # called by the INT/TERM trap
on_signal() {
    stopping=1
    [[ -z "$gateway_pid" ]] || kill -TERM "$gateway_pid" 2>/dev/null || true
}

trap cleanup EXIT
trap on_signal INT TERM
# models.sh prints the servers it started (not those already running) on stdout, then we add
# its status. On failure it has already stopped the ones it started.
mapfile -t out < <(bash "$TRIAGE_LOCAL_DIR/models.sh" start; echo "rc=$?")
if ((${#out[@]} == 0)) || [[ "${out[-1]}" != rc=0 ]]; then
    triage_die "the local models did not start (messages above)"
fi
started=("${out[@]:0:${#out[@]}-1}")
((stopping == 0)) || exit 130

cd "$TRIAGE_REPO_ROOT"
triage_log "starting gateway: $triage serve --config $config $*"
"$triage" serve --config "$config" "$@" &
gateway_pid=$!
rc=0
wait "$gateway_pid" || rc=$?
# A trapped signal interrupts `wait`; wait again until the gateway has really exited.
while kill -0 "$gateway_pid" 2>/dev/null; do
    rc=0
    wait "$gateway_pid" || rc=$?
done
gateway_pid=""
# 0, 130, 143: it was asked to stop (a signal may reach it without passing through this script).
if ((stopping || rc == 0 || rc == 130 || rc == 143)); then
    triage_log "gateway stopped"
    exit 0
fi
triage_log "the gateway exited with status $rc (its messages are above)"
exit "$rc"
