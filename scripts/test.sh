#!/usr/bin/env bash
# Set up and run every check: lint, types, the unit and integration tests.
# The integration tests start their own private mosquitto.
# Usage: scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --test

echo "== ruff"
.venv/bin/ruff check khod clients tests bench
.venv/bin/ruff format --check khod clients tests bench
echo "== mypy"
.venv/bin/mypy
echo "== pytest"
# A hung test must not hold CI for its whole budget.
timeout --signal=INT 1500 .venv/bin/pytest -q -p no:cacheprovider "$@"
