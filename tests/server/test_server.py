"""End to end on a real ComfyUI server (``main.py --cpu``) with the package installed from its archive.

What a user sees: the package loads without a warning, its nodes are listed with tooltips,
categories and their documentation pages, and a workflow queued through ``POST /prompt`` calibrates,
applies and samples the trained reference model, saves images and logs the speed-up.
"""

import io
import json
import re

import numpy as np
from PIL import Image

from harness.metrics import psnr_8bit
from harness.reference_model import SHIFT, STEPS, UNET_CONFIG

NODES = ("HyCaCalibrate", "HyCaCacheSpeedUp", "HyCaApply", "HyCaSolverInspector")
BLOCKS = UNET_CONFIG["num_layers"]
SPEEDUP = re.compile(
    r"HyCa: (\d+) block calls computed, (\d+) predicted \(([\d.]+)x fewer block computations\)"
)
RUN_STEPS = re.compile(r"HyCa: (\d+) steps, (\d+) computed, (\d+) predicted")


def _startup_records(server) -> list[dict]:
    records = server.records()
    end = next(i for i, r in enumerate(records) if r["message"].startswith("Starting server"))
    return records[:end]


def test_package_loads_without_error_or_warning(server):
    package = str(server.base / "custom_nodes" / server.folder)
    ours = [
        r
        for r in _startup_records(server)
        if r["level"] not in ("DEBUG", "INFO")
        and (
            package in r["message"]
            or r["path"].startswith(package)
            or r["message"].startswith("HyCa")
            or "pyproject.toml" in r["message"]
        )
    ]
    assert not ours, json.dumps(ours, indent=1)
    # ComfyUI's own summary of the custom-node imports: ours is listed, and not as failed
    timing = [line for line in server.log().splitlines() if line.strip().endswith(package)]
    assert len(timing) == 1 and "IMPORT FAILED" not in timing[0], timing


def test_nodes_are_listed_with_tooltips_and_category(server):
    info = server.get_json("/object_info")
    for node in NODES:
        assert node in info, f"{node} missing from /object_info"
        spec = info[node]
        assert spec["category"] == "model_patches/hyca"
        assert spec["display_name"].startswith("HyCa ") and spec["description"].strip()
        assert spec["python_module"] == f"custom_nodes.{server.folder}"
        inputs = {**spec["input"]["required"], **spec["input"].get("optional", {})}
        assert inputs
        for name, (_, options) in inputs.items():
            assert options.get("tooltip", "").strip(), f"{node}.{name} has no tooltip"
        assert spec["output"] and all(tip and tip.strip() for tip in spec["output_tooltips"]), node


def _doc_url(spec: dict) -> str:
    """The URL ComfyUI's frontend (1.32) fetches a custom node's documentation from: the folder name is
    the second part of python_module, the file docs/<node id>.md under the pack's WEB_DIRECTORY."""
    kind, pack = spec["python_module"].split(".", 1)
    assert kind == "custom_nodes"
    return f"/extensions/{pack.split('@')[0]}/docs/{spec['name']}.md"


def test_every_node_has_a_served_doc_naming_its_inputs_and_outputs(server):
    info = server.get_json("/object_info")
    for node in NODES:
        spec = info[node]
        doc = server.get(_doc_url(spec)).decode()
        assert doc.startswith(f"# {spec['display_name']}\n"), doc[:80]
        names = [*spec["input"]["required"], *spec["input"].get("optional", {}), *spec["output_name"]]
        missing = [name for name in names if f"**{name}**" not in doc]
        assert not missing, f"web/docs/{node}.md does not describe {missing}"


# ------------------------------------------------------------------------------------------------
# a workflow through POST /prompt


def _api_node(info: dict, node_type: str, **given) -> dict:
    """An API-format node: the given inputs (links as [node id, output index]), every other required
    widget at its default, so the prompt follows the node definitions the server reports."""
    spec = info[node_type]
    inputs = dict(given)
    for name, (kind, *rest) in spec["input"]["required"].items():
        if name not in inputs:
            options = rest[0] if rest else {}
            assert "default" in options, f"{node_type}.{name} needs a value"
            inputs[name] = options["default"]
    return {"class_type": node_type, "inputs": inputs}


def _image(server, outputs: dict, node_id: str) -> np.ndarray:
    (image,) = outputs[node_id]["images"]
    query = f"filename={image['filename']}&subfolder={image['subfolder']}&type={image['type']}"
    return np.asarray(Image.open(io.BytesIO(server.get(f"/view?{query}"))).convert("RGB")).astype(np.float64)


def _logged_speedups(log: str) -> list[tuple[int, int, float]]:
    return [(int(a), int(b), float(c)) for a, b, c in SPEEDUP.findall(log)]


def _sampling(info, model, seed, positive="3", negative="4", latent="5"):
    return _api_node(
        info,
        "KSampler",
        model=model,
        seed=seed,
        steps=STEPS,
        cfg=1.0,
        sampler_name="euler",
        scheduler="simple",
        positive=[positive, 0],
        negative=[negative, 0],
        latent_image=[latent, 0],
        denoise=1.0,
    )


def test_calibrate_apply_and_sample_through_the_prompt_api(server):
    info = server.get_json("/object_info")
    seed, interval, warmup = 7, 4, 3
    prompt = {
        "1": _api_node(info, "UNETLoader", unet_name="reference_wan.safetensors", weight_dtype="default"),
        "2": _api_node(info, "ModelSamplingSD3", model=["1", 0], shift=SHIFT),
        "3": _api_node(info, "ReferenceClassConditioning", class_id=3),
        "4": _api_node(info, "ReferenceClassConditioning", class_id=-1),
        "5": _api_node(info, "EmptyHunyuanLatentVideo", width=128, height=128, length=1, batch_size=1),
        "6": _api_node(
            info,
            "HyCaCalibrate",
            model=["2", 0],
            positive=["3", 0],
            negative=["4", 0],
            latent_image=["5", 0],
            seed=seed,
            steps=STEPS,
            cfg=1.0,
            sampler_name="euler",
            scheduler="simple",
            interval=interval,
            warmup=warmup,
            save=True,
            recalibrate=True,  # the reference model's map ships in calibrations/: probe anew, at full compute
            tune=False,  # tuning's replays log runs of their own; this test reads the sampling run's
        ),
        "7": _api_node(
            info, "HyCaApply", model=["2", 0], interval=interval, warmup=warmup, solver_map=["6", 0]
        ),
        "8": _sampling(info, ["7", 0], seed),
        "9": _sampling(info, ["2", 0], seed),  # the stock model, full compute: the reference
        "10": _api_node(info, "ReferenceDecode", samples=["8", 0]),
        "11": _api_node(info, "SaveImage", images=["10", 0], filename_prefix="hyca"),
        "12": _api_node(info, "ReferenceDecode", samples=["9", 0]),
        "13": _api_node(info, "SaveImage", images=["12", 0], filename_prefix="full"),
        "14": _api_node(info, "ReferenceDecode", samples=["6", 1]),
        "15": _api_node(info, "SaveImage", images=["14", 0], filename_prefix="probe"),
        "16": _api_node(info, "HyCaSolverInspector", solver_map=["6", 0]),
        "17": _api_node(info, "SaveImage", images=["16", 0], filename_prefix="inspector"),
    }
    before = len(_logged_speedups(server.log()))
    outputs = server.run_prompt(prompt)["outputs"]

    hyca, full, probe = (_image(server, outputs, key) for key in ("11", "13", "15"))
    assert hyca.shape == full.shape == (32, 32, 3)
    assert np.array_equal(probe, full)  # the probe is a full-compute sampling, not a cached one
    assert not np.array_equal(hyca, full)  # steps were predicted...
    assert psnr_8bit(hyca, full) > 25, psnr_8bit(hyca, full)  # ...close to full compute
    plot = _image(server, outputs, "17")
    assert min(plot.shape[:2]) > 300 and plot.std() > 1  # the Inspector drew its figure
    saved = sorted((server.base / "models" / "hyca").glob("*.hyca.safetensors"))
    assert len(saved) == 1, saved
    # and beside the checkpoint, found first by later runs (the workflow's loader names its file)
    beside = server.base / "models" / "diffusion_models" / "reference_wan.safetensors.hyca"
    assert beside.is_file()

    # the speed-up, as the server logged it for this run
    ((computed, predicted, ratio),) = _logged_speedups(server.log())[before:]
    assert computed + predicted == STEPS * BLOCKS
    runs = [tuple(map(int, run)) for run in RUN_STEPS.findall(server.log())]
    assert (STEPS, computed // BLOCKS, predicted // BLOCKS) in runs
    assert ratio == round(STEPS / (computed // BLOCKS), 2) and ratio >= 3, ratio

    # a second prompt: HyCa Apply with no map connected loads the map the first one saved
    reuse = {key: prompt[key] for key in ("1", "2", "3", "4", "5")}
    reuse["7"] = _api_node(info, "HyCaApply", model=["2", 0], interval=interval, warmup=warmup)
    reuse["8"] = _sampling(info, ["7", 0], seed + 1)
    reuse["9"] = _sampling(info, ["2", 0], seed + 1)
    reuse["10"], reuse["11"] = prompt["10"], prompt["11"]
    reuse["12"], reuse["13"] = prompt["12"], prompt["13"]
    outputs = server.run_prompt(reuse)["outputs"]
    assert f"HyCa: using solver map {beside}" in server.log()
    assert len(_logged_speedups(server.log())[before:]) == 2
    hyca, full = _image(server, outputs, "11"), _image(server, outputs, "13")
    assert not np.array_equal(hyca, full) and psnr_8bit(hyca, full) > 25, psnr_8bit(hyca, full)
