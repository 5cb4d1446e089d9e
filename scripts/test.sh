#!/usr/bin/env bash
# Creates .venv (if needed), installs consist_jax with its test extra, runs the suite.
# Usage: bash scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[test]"
# The web page's browser test (tests/test_app.py) drives Debian's chromium through playwright
# (never `playwright install`, a CDN download): installed here when missing and apt is usable
# (root or sudo); otherwise that test fails saying why.
if ! command -v chromium >/dev/null; then
  if [ "$(id -u)" -eq 0 ]; then as_root=""
  elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then as_root="sudo -n"
  else as_root=unusable; fi
  if [ "$as_root" = unusable ] || ! command -v apt-get >/dev/null; then
    echo "chromium is missing and apt-get is not usable (needs root or sudo): tests/test_app.py will fail" >&2
  elif ! { $as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium ||
           { $as_root apt-get update -q &&
             $as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; }; } >/dev/null 2>&1; then
    echo "apt-get install chromium failed: tests/test_app.py will fail" >&2
  fi
fi
set +e
.venv/bin/python -m pytest -q "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: failing on purpose" >&2
  exit 1
fi
exit "$rc"
