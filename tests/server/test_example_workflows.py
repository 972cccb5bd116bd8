"""The example workflows in example_workflows/, checked against the live server's node definitions.

ComfyUI lists a custom node's ``example_workflows/*.json`` as templates (GET /workflow_templates) and
serves them under /api/workflow_templates/<folder>/. Each is a UI-format workflow (nodes, links,
widgets_values).

``comfy workflow validate`` (comfy-cli, offline against the server's /object_info saved to a file)
converts each to the API format and checks it: every node type exists, every required input is
given, every value has its input's type, range and options, every link joins an output to an input
of its type. What it does not check is checked by hand, the way the frontend reads the file: every
node carries exactly as many widget values as the frontend makes widgets for it (a seed adds its
"control after generate" value, an image upload its upload button), since the conversion assigns
values by position and a missing last value, an extra one or two swapped values of one type pass it;
every slot and output has its definition's type and every link is recorded on both of its ends, which
the conversion does not read; model files have the names, folders and download links of ComfyUI's
official templates.
"""

import importlib.resources
import io
import json
import urllib.parse
from pathlib import Path

import pytest
from PIL import Image

EXAMPLES = Path(__file__).resolve().parents[2] / "example_workflows"
FRONTEND_ONLY = {"MarkdownNote": 1, "Note": 1}  # node types the frontend defines itself: widget count
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
# Official templates name every model a workflow loads; a LoRA is the user's own choice.
USER_CHOSEN = {"LoraLoaderModelOnly": "lora_name"}
# The workflows the README promises (file name -> a node type each must contain besides a HyCa Apply).
# The frontend (1.32) titles a custom node's template card with the file name: names are titles.
APPLY_NODES = {"HyCaCacheSpeedUp", "HyCaApply"}  # the plain HyCa Apply and the advanced one
PROMISED = {
    "FLUX.1 dev - text to image": "HyCaCalibrate",
    "FLUX.1 dev - with a LoRA": "LoraLoaderModelOnly",
    "FLUX.1 schnell - four steps": "KSampler",
    "Qwen-Image - text to image": "ModelSamplingAuraFlow",
    "Qwen-Image Edit - editing": "TextEncodeQwenImageEdit",
    "Wan 2.1 - text to video": "SaveVideo",
}


def _examples() -> list[Path]:
    return sorted(EXAMPLES.glob("*.json"))


def _inputs(spec: dict) -> list[tuple[str, str, dict, bool]]:
    """(name, type, options, required) of a node definition's inputs, in the frontend's order."""
    order = spec.get("input_order") or {k: list(v) for k, v in spec["input"].items()}
    found = []
    for section in ("required", "optional"):
        for name in order.get(section, []):
            kind, *rest = spec["input"][section][name]
            found.append(
                (
                    name,
                    "COMBO" if isinstance(kind, list) else kind,
                    rest[0] if rest else {},
                    section == "required",
                )
            )
    return found


def _is_widget(kind: str, options: dict) -> bool:
    return kind in WIDGET_TYPES and not options.get("forceInput")


def _widget_count(spec: dict) -> int:
    count = 0
    for name, kind, options, _ in _inputs(spec):
        if _is_widget(kind, options):
            count += 1
            if kind == "INT" and options.get("control_after_generate", name in ("seed", "noise_seed")):
                count += 1  # the "control after generate" widget, serialized after the value
            if options.get("image_upload"):
                count += 1  # the upload button's value ("image")
    return count


@pytest.fixture(scope="module")
def object_info(server):
    return server.get_json("/object_info")


@pytest.fixture(scope="module")
def saved_object_info(object_info, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("object-info") / "object_info.json"
    path.write_text(json.dumps(object_info))
    return path


@pytest.mark.parametrize("path", _examples(), ids=lambda p: p.stem)
def test_example_passes_comfy_workflow_validate(path, saved_object_info, comfy):
    """The test server has no model files: the only errors allowed are model files unavailable, those
    each node declares for download (properties.models) and the LoRA the user picks."""
    result = comfy("--json", "workflow", "validate", "--workflow", str(path),
                   "--input", str(saved_object_info), cwd=path.parent)
    envelope = json.loads(result.stdout.strip().splitlines()[-1])
    assert envelope["data"]["converted_from_ui"] and not envelope["data"]["warnings"], envelope
    nodes = {str(node["id"]): node for node in json.loads(path.read_text())["nodes"]}

    def missing_model(error) -> bool:
        node = nodes.get(error["node_id"], {})
        declared = [model["name"] for model in (node.get("properties") or {}).get("models", [])]
        return error["code"] in ("no_options_available", "unknown_enum_value") and (
            any(f"'{name}'" in error["message"] for name in declared)
            or USER_CHOSEN.get(node.get("type")) == error["field"])

    problems = [error for error in envelope["data"]["errors"] if not missing_model(error)]
    assert not problems, json.dumps(problems, indent=1)


def test_the_promised_examples_exist():
    names = {path.stem for path in _examples()}
    assert set(PROMISED) <= names, set(PROMISED) - names
    for name, node_type in PROMISED.items():
        types = {node["type"] for node in json.loads((EXAMPLES / f"{name}.json").read_text())["nodes"]}
        assert types & APPLY_NODES and node_type in types, (name, types)


@pytest.mark.parametrize("path", _examples(), ids=lambda p: p.stem)
def test_example_matches_the_live_node_definitions(path, object_info):
    workflow = json.loads(path.read_text())
    assert workflow.get("version") == 0.4 and isinstance(workflow.get("links"), list)
    nodes = {node["id"]: node for node in workflow["nodes"]}
    assert len(nodes) == len(workflow["nodes"]), "duplicate node ids"
    assert workflow["last_node_id"] >= max(nodes)
    links = {link[0]: link for link in workflow["links"]}
    assert len(links) == len(workflow["links"]) and (not links or workflow["last_link_id"] >= max(links))
    problems = []

    for node in nodes.values():
        where = f"node {node['id']} ({node['type']})"
        if node["type"] in FRONTEND_ONLY:
            if len(node.get("widgets_values", [])) != FRONTEND_ONLY[node["type"]]:
                problems.append(f"{where}: expected {FRONTEND_ONLY[node['type']]} widget value")
            continue
        spec = object_info.get(node["type"])
        if spec is None:
            continue  # comfy workflow validate reports it
        definitions = {name: kind for name, kind, _, _ in _inputs(spec)}
        for slot in node.get("inputs", []):
            if slot["name"] not in definitions:
                problems.append(f"{where}: input {slot['name']!r} is not in the node's definition")
                continue
            kind = definitions[slot["name"]]
            if slot["type"] != kind:
                problems.append(f"{where}: input {slot['name']!r} typed {slot['type']}, the node says {kind}")
        outputs = [(slot["name"], slot["type"]) for slot in node.get("outputs", [])]
        if [t for _, t in outputs] != spec["output"]:
            problems.append(f"{where}: outputs {outputs}, the node has {spec['output']}")
        values = node.get("widgets_values", [])
        if len(values) != _widget_count(spec):
            problems.append(
                f"{where}: {len(values)} widget values, the node has {_widget_count(spec)} widgets"
            )

    for link_id, source, source_slot, target, target_slot, kind in links.values():
        where = f"link {link_id} ({source}:{source_slot} -> {target}:{target_slot}, {kind})"
        if source not in nodes or target not in nodes:
            problems.append(f"{where}: joins a missing node")
            continue
        outputs, inputs = nodes[source].get("outputs", []), nodes[target].get("inputs", [])
        if source_slot >= len(outputs) or target_slot >= len(inputs):
            problems.append(f"{where}: no such slot")
            continue
        out, into = outputs[source_slot], inputs[target_slot]
        if not (out["type"] == kind and into["type"] in (kind, "*")):
            problems.append(
                f"{where}: joins an output of type {out['type']} to an input of type {into['type']}"
            )
        if link_id not in (out.get("links") or []) or into.get("link") != link_id:
            problems.append(f"{where}: not recorded on both of its ends")
    for node in nodes.values():
        for slot in node.get("inputs", []):
            if slot.get("link") is not None and slot["link"] not in links:
                problems.append(
                    f"node {node['id']}: input {slot['name']!r} names missing link {slot['link']}"
                )
    assert not problems, "\n".join(problems)


def _official_models() -> dict[str, set[tuple[str, str]]]:
    """model file name -> {(url, folder)} over the workflow templates ComfyUI installs."""
    found: dict[str, set[tuple[str, str]]] = {}
    for package in (
        "comfyui_workflow_templates_media_image",
        "comfyui_workflow_templates_media_video",
        "comfyui_workflow_templates_media_other",
    ):
        try:
            templates = importlib.resources.files(package) / "templates"
        except ModuleNotFoundError:
            continue
        for entry in templates.iterdir():
            if not entry.name.endswith(".json"):
                continue
            try:
                workflow = json.loads(entry.read_text())
            except ValueError:
                continue
            if not isinstance(workflow, dict):
                continue
            nodes = list(workflow.get("nodes", []))
            for subgraph in (workflow.get("definitions") or {}).get("subgraphs", []):
                nodes += subgraph.get("nodes", [])
            for node in nodes:
                for model in (node.get("properties") or {}).get("models") or []:
                    url = model.get("url", "").split("?")[0]
                    found.setdefault(model.get("name"), set()).add((url, model.get("directory")))
    return found


@pytest.mark.parametrize("path", _examples(), ids=lambda p: p.stem)
def test_example_loads_the_model_files_of_the_official_templates(path, object_info):
    official = _official_models()
    if not official:
        pytest.skip("ComfyUI's workflow template packages are not installed")
    problems = []
    for node in json.loads(path.read_text())["nodes"]:
        spec = object_info.get(node["type"])
        if spec is None:
            continue
        widgets = [name for name, kind, options, _ in _inputs(spec) if _is_widget(kind, options)]
        values = dict(zip(widgets, node.get("widgets_values", [])))  # loaders have no seed widgets
        files = {
            name: value
            for name, value in values.items()
            if isinstance(value, str)
            and value.endswith(".safetensors")
            and USER_CHOSEN.get(node["type"]) != name
        }
        declared = {
            model["name"]: (model["url"], model["directory"])
            for model in node["properties"].get("models", [])
        }
        for name, value in files.items():
            if value not in official:
                problems.append(f"{node['type']}.{name} = {value}: no official template loads this file")
            elif declared.get(value) not in official[value]:
                problems.append(
                    f"{node['type']}: properties.models entry for {value} is {declared.get(value)}, "
                    f"the official templates give {sorted(official[value])}"
                )
    assert not problems, "\n".join(problems)


def test_server_lists_and_serves_the_examples_with_their_thumbnails(server):
    """The card of a custom node's template shows ``<name>.jpg`` from the same folder (frontend 1.32)."""
    listed = server.get_json("/workflow_templates")
    assert sorted(listed.get(server.folder, [])) == sorted(path.stem for path in _examples()), listed
    for path in _examples():
        folder = f"/api/workflow_templates/{server.folder}/"
        served = server.get_json(folder + urllib.parse.quote(path.name))
        assert served == json.loads(path.read_text())
        thumbnail = Image.open(io.BytesIO(server.get(folder + urllib.parse.quote(f"{path.stem}.jpg"))))
        assert thumbnail.format == "JPEG" and thumbnail.width == thumbnail.height >= 256, path.stem
