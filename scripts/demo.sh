#!/usr/bin/env bash
# Samples the bundled small model through ComfyUI with and without HyCa; prints the speed-up and
# the difference to full compute, and writes a side-by-side image. Arguments go to harness.demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec "${HYCA_VENV:-.venv}/bin/python" -m harness.demo "$@"
