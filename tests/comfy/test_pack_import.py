"""ComfyUI's start-up does not pay for what HyCa needs only when it calibrates: loading the pack through
ComfyUI's own custom-node loader imports no scikit-learn (it is imported when a calibration first runs)."""

import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LOAD = """
import asyncio, json, sys, tempfile
from harness import comfy_runtime, node_pack
comfy_runtime.load(base_directory=tempfile.mkdtemp(prefix="hyca-import-"))
before = set(sys.modules)
pack = node_pack.load()
nodes = asyncio.run(pack.nodes.comfy_entrypoint().get_node_list())
loaded = sorted(set(sys.modules) - before)
print(json.dumps({"loaded": loaded, "nodes": [n.define_schema().node_id for n in nodes]}))
"""


def test_loading_the_pack_imports_no_scikit_learn():
    with tempfile.TemporaryDirectory() as cwd:
        done = subprocess.run([sys.executable, "-c", LOAD], cwd=cwd, capture_output=True, text=True,
                              timeout=600, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert {"HyCaCacheSpeedUp", "HyCaApply", "HyCaCalibrate"} <= set(report["nodes"])  # the pack did load
    assert not [m for m in report["loaded"] if m.split(".")[0] == "sklearn"]
