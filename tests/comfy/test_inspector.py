"""HyCa Solver Inspector: what an artist reads off it, and what it costs the ComfyUI process."""

import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
SHIPPED_MAP = next((REPO / "calibrations").glob("*.hyca.safetensors"))


def _colour_share(image: np.ndarray, hex_colour: str) -> float:
    rgb = np.array([int(hex_colour[i:i + 2], 16) for i in (1, 3, 5)])
    pixels = np.round(image[0].numpy() * 255).astype(int)
    return float((np.abs(pixels - rgb).sum(axis=-1) <= 3).mean())


def test_inspector_shows_which_steps_compute_and_the_saving(pack):
    inspector = pack.nodes.inspector_node
    solver_map = pack.hyca_core.solver_map.SolverMap.load(SHIPPED_MAP)
    image, text = inspector.HyCaSolverInspector.execute(solver_map).result
    assert image.ndim == 4 and image.shape[0] == 1 and image.shape[-1] == 3
    # the strip: squares in both colours, the computed ones fewer than the predicted ones
    computed, predicted = (_colour_share(image, c) for c in (inspector.COMPUTED, inspector.PREDICTED))
    assert 0 < computed < predicted
    # the plain summary counts the steps of the tuned schedule, as HyCa Apply's fixed schedule runs them
    steps = int(solver_map.info["steps"])
    mask = solver_map.probe_schedule.mask(steps)
    runs, fewer = int(mask.sum()), pack.hyca_core.schedule.speedup(mask)
    assert f"{runs} steps run the model and {steps - runs} are predicted" in text
    assert f"{fewer:.2f}x fewer block computations" in text
    assert text.index("fewer block computations") < text.index("solver mix")  # the expert part comes after
    masks = inspector.interval_masks(solver_map, steps)
    assert masks[1].all() and [int(m.sum()) for m in masks.values()] == sorted(
        (int(m.sum()) for m in masks.values()), reverse=True)  # a larger N never computes more


def test_inspector_shows_where_the_tuning_found_fewer_plain_steps_as_good(pack):
    """The map's tuning as a plot of closeness against speed-up (HyCa's and plain sampling's) and, per N,
    HyCa's lead in words; an untuned map says that nothing was measured."""
    inspector = pack.nodes.inspector_node
    untuned = pack.hyca_core.solver_map.SolverMap.load(SHIPPED_MAP)
    steps = len(untuned.probe_sigmas)
    computed = {n: pack.hyca_core.tuning.computed_steps(steps, n) for n in (4, 8)}
    entries = {"4": (40.0, 35.0), "8": (30.0, 33.0)}
    tuning = {n: {"warmup": 2, "placement": "fixed", "psnr": h, "computed": computed[int(n)],
                  "plain": {"sampler": "dpmpp_2m", "psnr": p}} for n, (h, p) in entries.items()}
    tuning["4"]["searched"] = {"steps": steps, "full": [0, 1, 4, 9]}  # HyCa Calibrate's search
    tuned = replace(untuned, info={**untuned.info, "tuned_seed": 1, "tuned": tuning})
    plain_colour = inspector.PLAIN
    image, text = inspector.HyCaSolverInspector.execute(tuned).result
    assert f"N=4: +5.0 dB: HyCa, its full steps searched for {steps}-step runs" in text
    assert "N=8: -3.0 dB: fewer plain steps instead\n" in text
    assert "N=6: " in text and "(interpolated): " in text.split("N=6: ")[1].splitlines()[0]
    assert "N=3: +5.0 dB (at least): HyCa" in text
    assert _colour_share(image, plain_colour) > 0
    image, text = inspector.HyCaSolverInspector.execute(untuned).result
    assert "This map is not tuned" in text and _colour_share(image, plain_colour) == 0


def test_loading_the_pack_leaves_matplotlib_alone():
    """Importing matplotlib at pack load cost start-up time, and its `use("Agg")` switched the backend of
    the whole ComfyUI process. Now neither loading the pack nor drawing a plot touches the backend."""
    script = textwrap.dedent(f"""
        import sys
        from harness import node_pack
        pack = node_pack.load()
        assert "matplotlib" not in sys.modules, "the pack imported matplotlib when loaded"
        import matplotlib
        matplotlib.use("svg")  # the process's own choice, which the Inspector must keep
        solver_map = pack.hyca_core.solver_map.SolverMap.load({str(SHIPPED_MAP)!r})
        pack.nodes.inspector_node.HyCaSolverInspector.execute(solver_map)
        assert matplotlib.get_backend() == "svg", matplotlib.get_backend()
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True,
                            timeout=300, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr[-3000:]
