#!/usr/bin/env bash
# Runs the whole test suite on the development runtime, setting it up first if needed.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec "${HYCA_VENV:-.venv}/bin/python" -m pytest "$@"
