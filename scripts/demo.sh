#!/usr/bin/env bash
# Set up and run the demo: a private mosquitto, a khod daemon, 16 simulated
# participants, a handover committed to disk and a verified restore.
# Usage: scripts/demo.sh [--participants N] [--output DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/khod demo "$@"
