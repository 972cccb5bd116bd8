#!/usr/bin/env bash
# Runs the whole test suite on the development runtime, setting it up first if needed.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
# The browser tests (tests/server/test_browser.py) drive headless Chromium; without it they skip.
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "[test] installing chromium for the browser tests" >&2
  { apt-get update -qq \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium; } >/dev/null \
    || echo "[test] could not install chromium; the browser tests will skip" >&2
fi
# The house rules of pyproject.toml's [tool.ruff]: a violation fails the run before any test.
"${HYCA_VENV:-.venv}/bin/python" -m ruff check --quiet .
exec "${HYCA_VENV:-.venv}/bin/python" -m pytest "$@"
