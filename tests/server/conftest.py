"""A real ComfyUI server with this package installed the way the Comfy Registry installs it.

The session's server runs ComfyUI's own ``main.py`` (through ``launch_comfyui.py``) with ``--cpu``
on a free port and a fresh ``--base-directory`` that holds:

- ``custom_nodes/<project name>/``: the registry archive as ``comfy node pack`` builds it (git's
  file list minus ``.comfyignore``), unpacked, so a file the package needs but the archive drops fails
  here;
- ``custom_nodes/hyca_test_reference/``: test-only nodes for the reference model (``reference_pack``);
- ``models/diffusion_models/reference_wan.safetensors``: the trained reference model.

Nothing here imports ComfyUI into the test process.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import tomllib

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
TEST_PACK = "hyca_test_reference"
STARTUP_TIMEOUT = 150  # seconds; about 10-30 s on two busy cores


def project() -> dict:
    with open(REPO / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


COMFY_CLI = Path(sys.executable).parent / "comfy"


@pytest.fixture(scope="session")
def comfy(tmp_path_factory) -> Callable[..., subprocess.CompletedProcess]:
    """``comfy(*args, cwd=...)`` runs comfy-cli with its telemetry off (DO_NOT_TRACK) and its config in
    a throw-away home, not the user's."""
    if not COMFY_CLI.exists():
        pytest.skip("comfy-cli is not installed (requirements-dev.txt; scripts/setup_env.sh installs it)")
    home = tmp_path_factory.mktemp("comfy-cli-home")
    env = dict(os.environ, HOME=str(home), DO_NOT_TRACK="1", NO_COLOR="1")

    def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
        return subprocess.run([str(COMFY_CLI), *args], cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=300)

    return run


@pytest.fixture(scope="session")
def published_archive(tmp_path_factory, comfy) -> Path:
    """The archive the Comfy Registry gets: ``comfy node pack`` (git's files minus ``.comfyignore``).

    It packs a snapshot of the working tree in which the files not yet committed but not ignored by git
    are committed too (they will be), so a test run sees the archive of what it tests.
    """
    snapshot = tmp_path_factory.mktemp("archive-snapshot")
    listed = subprocess.run(
        ["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        check=True, capture_output=True, text=True,
    ).stdout
    for path in filter(None, listed.split("\0")):
        if (REPO / path).is_file():
            (snapshot / path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / path, snapshot / path)
    for command in (["init", "--quiet"], ["add", "--all"]):
        subprocess.run(["git", "-C", str(snapshot), *command], check=True, capture_output=True)
    packed = comfy("node", "pack", cwd=snapshot)
    assert packed.returncode == 0 and (snapshot / "node.zip").is_file(), packed.stdout + packed.stderr
    return snapshot / "node.zip"


@pytest.fixture(scope="session")
def published_files(published_archive) -> list[str]:
    with zipfile.ZipFile(published_archive) as archive:
        return sorted(archive.namelist())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    url: str
    base: Path
    folder: str  # the package's folder name in custom_nodes
    log_path: Path
    records_path: Path
    process: subprocess.Popen

    def get(self, path: str, timeout: float = 30) -> bytes:
        with urllib.request.urlopen(self.url + path, timeout=timeout) as response:
            return response.read()

    def get_json(self, path: str, timeout: float = 30):
        return json.loads(self.get(path, timeout))

    def post_json(self, path: str, payload: dict, timeout: float = 30):
        request = urllib.request.Request(
            self.url + path, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as error:  # ComfyUI explains a refused prompt in the body
            raise AssertionError(
                f"POST {path} -> {error.code}: {error.read().decode(errors='replace')}"
            ) from None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def records(self) -> list[dict]:
        return [json.loads(line) for line in self.records_path.read_text().splitlines() if line.strip()]

    def run_prompt(self, prompt: dict, timeout: float = 240) -> dict:
        """Queue an API-format prompt through POST /prompt and wait for its /history entry."""
        prompt_id = self.post_json("/prompt", {"prompt": prompt, "client_id": "hyca-tests"})["prompt_id"]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            entry = self.get_json(f"/history/{prompt_id}").get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None:
                if entry["status"].get("status_str") != "success":
                    raise AssertionError(
                        f"prompt failed: {json.dumps(entry['status'], indent=1)}\n{self.log()[-4000:]}"
                    )
                return entry
            if self.process.poll() is not None:
                raise AssertionError(f"the server exited ({self.process.returncode}):\n{self.log()[-4000:]}")
            time.sleep(0.25)
        raise AssertionError(f"prompt {prompt_id} did not finish in {timeout} s:\n{self.log()[-4000:]}")


@contextlib.contextmanager
def _running_server(base: Path, folder: str) -> Iterator[Server]:
    """ComfyUI's ``main.py`` serving ``base`` (its ``--base-directory``) until the block ends."""
    port = _free_port()
    log_path, records_path = base / "server.log", base / "server-records.jsonl"
    env = dict(os.environ, HYCA_TEST_REPO=str(REPO), HYCA_TEST_RECORDS=str(records_path),
               HYCA_TEST_PARENT_PID=str(os.getpid()), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    command = [sys.executable, str(HERE / "launch_comfyui.py"), "--cpu", "--listen", "127.0.0.1",
               "--port", str(port), "--base-directory", str(base), "--database-url", "sqlite:///:memory:"]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=base, env=env)
    srv = Server(f"http://127.0.0.1:{port}", base, folder, log_path, records_path, process)
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while True:
            if process.poll() is not None:
                raise RuntimeError(
                    f"ComfyUI exited ({process.returncode}) while starting:\n{srv.log()[-6000:]}"
                )
            try:
                srv.get("/system_stats", timeout=2)
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"ComfyUI did not answer in {STARTUP_TIMEOUT} s:\n{srv.log()[-6000:]}")
                time.sleep(0.25)
        yield srv
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="session")
def server(tmp_path_factory, published_archive) -> Iterator[Server]:
    base = tmp_path_factory.mktemp("comfyui-base")
    folder = project()["project"]["name"]  # the registry installs a node into custom_nodes/<node id>
    with zipfile.ZipFile(published_archive) as archive:
        archive.extractall(base / "custom_nodes" / folder)
    shutil.copytree(
        HERE / "reference_pack",
        base / "custom_nodes" / TEST_PACK,
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    (base / "models" / "diffusion_models").mkdir(parents=True)
    shutil.copy2(
        REPO / "harness" / "assets" / "reference_wan.safetensors", base / "models" / "diffusion_models"
    )
    with _running_server(base, folder) as srv:
        yield srv


@pytest.fixture
def start_server():
    """``with start_server(base, folder) as server``: a ComfyUI server on another base directory."""
    return _running_server
