#!/usr/bin/env bash
# Samples the trained reference model through ComfyUI with and without HyCa and with fewer steps;
# prints quality and speed-up, writes output/demo.png side by side. Arguments go to harness.demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec "${HYCA_VENV:-.venv}/bin/python" -m harness.demo "$@"
