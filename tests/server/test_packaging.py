"""What the Comfy Registry and ComfyUI-Manager get: pyproject metadata, requirements, the archive.

comfy-cli's own checks run first: ``comfy node validate`` (the registry's publishing checks: the
pyproject parses, a version is set, the license, classifier and requires-comfyui formats, ruff's
exec/eval rules) and ``comfy node pack`` (the archive, built in conftest.py). Checked by hand, what
they do not check: the registry specification's rules for the node id, the other [tool.comfy] fields
and the icon (docs.comfy.org/registry/specifications), that requirements.txt and pyproject agree and
name no torch, which files the archive keeps and drops, and that its code imports nothing it drops.
No server needed.
"""

import ast
import re
from pathlib import Path

import tomllib

REPO = Path(__file__).resolve().parents[2]

SEMVER = re.compile(r"^\d+\.\d+\.\d+$")
NODE_ID = re.compile(r"^[A-Za-z][A-Za-z0-9._-]*$")
REQUIREMENT_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")
NEVER_DECLARED = {"torch", "torchvision", "torchaudio", "comfyui", "comfyui-frontend-package"}


def project() -> dict:
    with open(REPO / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


def _requirement_lines() -> list[str]:
    lines = (REPO / "requirements.txt").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def test_pyproject_has_the_registry_fields():
    config = project()
    meta, comfy = config["project"], config["tool"]["comfy"]
    name = meta["name"]
    assert len(name) < 100 and NODE_ID.match(name) and not re.search(r"[._-]{2}", name), name
    assert "comfyui" not in name.lower()  # the spec's advice: the node id names the node, not ComfyUI
    assert SEMVER.match(meta["version"]), meta["version"]
    assert meta["description"].strip()
    assert meta["license"] == {"file": "LICENSE"} and (REPO / "LICENSE").is_file()
    assert meta["urls"]["Repository"].startswith("https://github.com/")
    for key in ("PublisherId", "DisplayName", "Icon", "requires-comfyui"):
        assert str(comfy.get(key, "")).strip(), f"[tool.comfy] {key} is empty"
    assert "web" not in comfy  # WEB_DIRECTORY serves web/; a `web` key would register it a second time


def test_comfy_node_validate_passes_without_a_warning(comfy):
    """comfy-cli reports a malformed field as a warning and drops it from what it publishes, with
    exit status 0: a warning fails here."""
    result = comfy("node", "validate", cwd=REPO)
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "All validation checks passed" in output, output
    assert "warning" not in output.lower(), output


def test_icon_url_names_a_file_the_repository_holds():
    icon = project()["tool"]["comfy"]["Icon"]
    repository = project()["project"]["urls"]["Repository"].removeprefix("https://github.com/")
    prefix = f"https://raw.githubusercontent.com/{repository}/main/"
    assert icon.startswith(prefix), icon
    path = REPO / icon.removeprefix(prefix)
    assert path.suffix in (".svg", ".png", ".jpg") and path.is_file(), path


def test_license_is_gpl3():
    text = (REPO / "LICENSE").read_text()
    assert "GNU GENERAL PUBLIC LICENSE" in text and "Version 3, 29 June 2007" in text


def test_requirements_never_name_torch_and_match_pyproject():
    lines = _requirement_lines()
    names = {REQUIREMENT_NAME.match(line).group(1).lower().replace("_", "-") for line in lines}
    assert not names & NEVER_DECLARED, (
        names & NEVER_DECLARED
    )  # ComfyUI brings them; a pin here breaks installs
    assert sorted(lines) == sorted(project()["project"]["dependencies"])  # the registry reads pyproject


def test_archive_holds_the_package_and_drops_development_files(published_files):
    files = set(published_files)
    for required in ("__init__.py", "pyproject.toml", "requirements.txt", "LICENSE", "README.md"):
        assert required in files, required
    for folder in ("nodes", "hyca_core"):
        sources = {p.relative_to(REPO).as_posix() for p in (REPO / folder).glob("*.py")}
        assert sources <= files, sources - files
    documented = ("HyCaCalibrate", "HyCaCacheSpeedUp", "HyCaApply", "HyCaSolverInspector")
    assert {f"web/docs/{node}.md" for node in documented} <= files
    assert "web/js/hyca_migrate.js" in files  # old HyCaApply workflows' widget values
    assert any(path.startswith("example_workflows/") and path.endswith(".json") for path in files)
    dropped = (
        "tests/",
        "harness/",
        "benchmarks/",
        "scripts/",
        ".ci/",
        "artifacts/",
        "output/",
        ".venv/",
        ".dev/",
    )
    assert not [path for path in files if path.startswith(dropped)]
    assert "requirements-dev.txt" not in files
    assert not [path for path in files if "__pycache__" in path or path.endswith(".pyc")]


def _imports(path: Path) -> list[tuple[int, str]]:
    """(level, module) of every import statement; level > 0 for relative imports."""
    tree = ast.parse(path.read_text(), str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(0, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append((node.level, node.module or ""))
    return found


def test_archive_code_imports_nothing_the_archive_drops(published_files):
    """The shipped code may import the standard library, ComfyUI, the requirements and itself: never
    the harness, the tests or a development tool."""
    development = {"harness", "tests", "benchmarks", "scripts", "pytest", "hypothesis"}
    for path in published_files:
        if not path.endswith(".py"):
            continue
        for level, module in _imports(REPO / path):
            if level == 0:
                assert module.split(".")[0] not in development, f"{path} imports {module}"
            else:  # a relative import must land inside the archive
                target = Path(path).parent
                for _ in range(level - 1):
                    target = target.parent
                if module:
                    target = target / module.split(".")[0]
                target = target.as_posix().removeprefix("./")
                assert f"{target}.py" in published_files or f"{target}/__init__.py" in published_files, (
                    f"{path}: relative import of {module!r} (level {level}) has no file in the archive"
                )
