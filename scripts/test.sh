#!/usr/bin/env bash
# Installs what the tests need into .venv, then runs the linters and the whole suite.
# Needs PostgreSQL and Redis (TEST_POSTGRES_URL / TEST_REDIS_URL; defaults on 127.0.0.1).
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[test,bench]'

.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy

status=0
.venv/bin/pytest "$@" || status=$?
if [ "$status" -eq 5 ]; then
  echo "pytest collected no tests: that is a failure here" >&2
  exit 1
fi
exit "$status"
