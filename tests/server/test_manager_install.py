"""Installing the package the way ComfyUI-Manager does: ``cm-cli install <git URL>``.

The repository (its committed HEAD, as a user's clone has it) is served over git's dumb HTTP protocol
from 127.0.0.1; cm-cli clones it into the ``custom_nodes/`` of a fresh ComfyUI base directory and
installs its requirements into this Python environment; then ComfyUI's ``main.py`` starts on that
base directory and must list its nodes.

Nothing reaches for the network. cm-cli's ``--mode local`` still fetches the Comfy Registry's node
list (comfyui-manager 4.3 reads its cache only in ``--mode cache``), so the test runs in cache mode
with an empty registry listing in the Manager's cache; the channel then is the node list that
ships inside the Manager package.
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import tomllib

from harness import comfy_runtime

REPO = Path(__file__).resolve().parents[2]

NODES = {"HyCaCalibrate", "HyCaCacheSpeedUp", "HyCaApply", "HyCaSolverInspector"}
CM_CLI = Path(sys.executable).parent / "cm-cli"


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # the dumb protocol asks for many absent loose objects
        pass


def _serve(folder: Path) -> http.server.ThreadingHTTPServer:
    handler = functools.partial(QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _manager_env(comfyui: Path) -> dict:
    return dict(os.environ, COMFYUI_PATH=str(comfyui), PYTHONPATH=str(comfyui), PYTHONUNBUFFERED="1")


def _seed_empty_registry(manager_dir: Path, comfyui: Path) -> None:
    """An empty Comfy Registry listing in the Manager's cache, written by the Manager's own code."""
    script = ("import sys; from comfyui_manager.common import cnr_utils, manager_util as m;"
              "m.cache_dir = sys.argv[1]; m.save_to_cache(cnr_utils.base_url + '/nodes', {'nodes': []})")
    subprocess.run([sys.executable, "-c", script, str(manager_dir / "cache")], check=True,
                   capture_output=True, env=_manager_env(comfyui), timeout=120)


@pytest.mark.skipif(not CM_CLI.exists(), reason="no cm-cli: comfyui-manager is not installed")
def test_cm_cli_installs_from_a_git_url_and_the_server_lists_the_nodes(tmp_path, start_server):
    with open(REPO / "pyproject.toml", "rb") as f:
        project = tomllib.load(f)["project"]
    name = project["name"]
    served = tmp_path / "git"
    bare = served / f"{name}.git"
    subprocess.run(["git", "clone", "--quiet", "--bare", "--single-branch", str(REPO), str(bare)], check=True)
    subprocess.run(["git", "-C", str(bare), "update-server-info"], check=True)  # the dumb protocol's index

    base = tmp_path / "comfyui-base"
    manager_dir = base / "user" / "__manager"
    (manager_dir / "cache").mkdir(parents=True)
    (base / "custom_nodes").mkdir()
    # cm-cli installs into the first custom_nodes folder ComfyUI knows; this makes it the fresh base's
    fresh = {"base_path": str(base), "is_default": True, "custom_nodes": "custom_nodes/"}
    (manager_dir / "extra_model_paths.yaml").write_text(json.dumps({"fresh_base": fresh}))  # JSON is YAML
    comfyui = comfy_runtime.comfyui_path()
    _seed_empty_registry(manager_dir, comfyui)

    http_server = _serve(served)
    try:
        url = f"http://127.0.0.1:{http_server.server_address[1]}/{name}.git"
        result = subprocess.run(
            [str(CM_CLI), "install", "--mode", "cache", "--user-directory", str(manager_dir), url],
            cwd=base, env=_manager_env(comfyui), capture_output=True, text=True, timeout=600)
    finally:
        http_server.shutdown()
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "Installation was successful" in output, output[-4000:]
    assert "Cannot connect to comfyregistry" not in output, output  # no fetch of the registry's list
    assert "FETCH DATA from: http" not in output, output  # nor of a remote channel
    package = base / "custom_nodes" / name
    assert (package / "__init__.py").is_file() and (package / "nodes").is_dir(), output[-2000:]
    executed = output.replace("\n", "")  # the Manager's log wraps its long lines
    for requirement in project["dependencies"]:
        assert f"'install', '{requirement}'" in executed, output[-4000:]

    with start_server(base, name) as server:
        info = server.get_json("/object_info")
        assert NODES <= info.keys(), server.log()[-4000:]
        assert all(info[node]["python_module"] == f"custom_nodes.{name}" for node in NODES)
