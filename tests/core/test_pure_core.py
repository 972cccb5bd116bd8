"""hyca_core is the pure algorithm: importing every module of it loads no ComfyUI module."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_importing_hyca_core_loads_no_comfy_module():
    modules = sorted(p.stem for p in (ROOT / "hyca_core").glob("*.py") if p.stem != "__init__")
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module('hyca_core.' + name)\n"
        "print(sorted(m for m in sys.modules if m == 'comfy' or m.startswith(('comfy.', 'comfy_'))))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                            check=True)
    assert len(modules) > 10 and result.stdout.strip() == "[]", result.stdout + result.stderr
