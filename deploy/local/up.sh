#!/usr/bin/env bash
# One command from a fresh clone to a working gateway on CPU:
#   bash deploy/local/up.sh [extra `triage serve` args]
# 1. setup.sh   - build llama-server and fetch the models (cached; ~6 min the first time)
# 2. models.sh  - start the student (:8001) and teacher stand-in (:8002) in the background
# 3. exec `triage serve --config config.yaml` in the foreground (Ctrl-C stops only the gateway;
#    `bash deploy/local/models.sh stop` stops the models).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

bash "$TRIAGE_LOCAL_DIR/setup.sh"
bash "$TRIAGE_LOCAL_DIR/models.sh" start

cd "$TRIAGE_REPO_ROOT"
if [[ -x .venv/bin/triage ]]; then
    triage=.venv/bin/triage
elif command -v triage >/dev/null; then
    triage="$(command -v triage)"
else
    triage_die "the triage CLI is not installed: python -m venv .venv && .venv/bin/pip install -e ."
fi
config="${TRIAGE_CONFIG:-config.yaml}"
triage_log "starting gateway: $triage serve --config $config $*"
exec "$triage" serve --config "$config" "$@"
