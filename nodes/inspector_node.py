"""HyCa Solver Inspector: what a solver map does to a run, what it chose and why, and whether another
map agrees.

matplotlib is imported only when a plot is drawn, and through its object-oriented API (a `Figure`
rendered by the Agg canvas): pyplot would pick a backend for the whole ComfyUI process.
"""

from __future__ import annotations

import io as bytes_io
import textwrap
from collections import Counter

import numpy as np
import torch
from comfy_api.latest import io
from PIL import Image

from ..hyca_core import tuning
from ..hyca_core.clustering import adjusted_rand
from ..hyca_core.indicators import INDICATOR_NAMES
from ..hyca_core.schedule import Schedule, speedup
from ..hyca_core.solver_map import SolverMap
from ..hyca_core.solvers import POOL, TIME_VARIABLES, solver
from .types import CATEGORY, SolverMapType

STRIP_INTERVALS = range(1, 9)  # the N drawn in the strip: 1 (computes every step) up to 8
COMPUTED, PREDICTED = "#1f4e79", "#bcd7ee"
PLAIN = "#c0504d"  # plain sampling, beside HyCa (drawn in COMPUTED) in the tuning panel


def _choice_names(block) -> list[str]:
    return [f"{solver(int(s)).name}/{TIME_VARIABLES[int(v)]}" for s, v in zip(block.solver, block.variable)]


def run_steps(solver_map: SolverMap) -> int:
    """The step count the strip is drawn for: the probe's, the count the artist calibrated with."""
    return int(solver_map.info.get("steps", len(solver_map.probe_sigmas)))


def interval_masks(solver_map: SolverMap, steps: int) -> dict[int, np.ndarray]:
    """N -> which of `steps` steps compute (True) with one full step every N, after the warm-up and
    before the final steps the map was tuned for: HyCa Apply's fixed schedule."""
    tuned = solver_map.probe_schedule
    return {n: Schedule(interval=n, warmup=tuned.warmup, final=tuned.final).mask(steps)
            for n in STRIP_INTERVALS if n <= steps}


def plain_summary(solver_map: SolverMap) -> str:
    """What the map does to a run, in words an artist reads: computed and predicted steps, the saving."""
    tuned, steps = solver_map.probe_schedule, run_steps(solver_map)
    mask = tuned.mask(steps)
    computed = int(mask.sum())
    model = solver_map.architecture.rsplit(".", 1)[-1] or "an unknown model"
    probe = f"{steps}-step probe" + (f" ({solver_map.info['sampler']}, {solver_map.info['scheduler']})"
                                     if {"sampler", "scheduler"} <= solver_map.info.keys() else "")
    return "\n".join([
        f"HyCa map for {model}, calibrated on a {probe}.",
        f"It was calibrated for {tuned.warmup} warm-up steps, then one full step every {tuned.interval}.",
        f"In a {steps}-step run with that setting, {computed} steps run the model and {steps - computed} are "
        f"predicted from the steps before them: {speedup(mask):.2f}x fewer block computations.",
        "Wall-clock time falls by less: the text encoder, the VAE and the prediction itself still take time.",
        "A larger N computes fewer steps and strays further from full compute; the strip shows each N.",
    ])


def tuning_summary(solver_map: SolverMap) -> str:
    """Per N of the strip, HyCa's lead over plain sampling with as many full steps, from the map's tuning
    (`tuning.verdict`), and which of the two to use."""
    tuned = tuning.from_info(solver_map.info)
    if not tuned:
        return ("This map is not tuned, so nothing says where plain sampling with fewer steps would do as "
                "well: HyCa Calibrate (tune on) or HyCa Apply's first run without a map tunes one.")
    steps = len(solver_map.probe_sigmas)
    lines = [f"Tuned on a {steps}-step run with seed {solver_map.info.get('tuned_seed', '?')}: HyCa against "
             f"plain sampling with as many full steps (HyCa needs a lead of {tuning.LEAD:g} dB here):"]
    for n in STRIP_INTERVALS[1:]:
        found = tuning.verdict(tuned, n, steps)
        if found is None:
            lines.append(f"N={n}: not measured")
            continue
        bound = "" if found.kind == "measured" else f" ({found.kind})"
        use = "HyCa" if found.recommended else "fewer plain steps instead"
        searched = tuned[n].searched if n in tuned else None
        where = "" if searched is None else f", its full steps searched for {searched[0]}-step runs"
        lines.append(f"N={n}: {found.lead:+.1f} dB{bound}: {use}{where}")
    return "\n".join(lines)


def _draw_tuning(ax, solver_map: SolverMap) -> None:
    """Closeness to full compute against speed-up at each tuned N: HyCa's and plain sampling's."""
    tuned = sorted(tuning.from_info(solver_map.info).items())
    steps = len(solver_map.probe_sigmas)
    x = [steps / t.computed for _, t in tuned]
    ax.plot(x, [t.psnr for _, t in tuned], "o-", color=COMPUTED, label="HyCa (tuned)")
    ax.plot(x, [t.plain_psnr for _, t in tuned], "s--", color=PLAIN,
            label="plain sampling, as many full steps")
    for (n, t), speed in zip(tuned, x):
        ax.annotate(f"N={n}", (speed, t.psnr), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set(title="in tuning: closeness to full compute (latent PSNR, dB) against speed-up",
           xlabel="fewer full steps (x)", ylabel="dB")
    ax.legend(fontsize=8)


def summary(solver_map: SolverMap, other: SolverMap | None = None) -> str:
    """Plain-text report: what the map does to a run, then the details (probe, solver mix, and the
    agreement with ``other`` if given)."""
    sizes = Counter()
    for block in solver_map.blocks.values():
        for name, size in zip(_choice_names(block), np.bincount(block.labels, minlength=block.clusters)):
            sizes[name] += int(size)
    total = sum(sizes.values())
    lines = [
        plain_summary(solver_map),
        "",
        tuning_summary(solver_map),
        "",
        f"Details: {solver_map.architecture}",
        f"probe: {len(solver_map.probe_sigmas)} steps, {solver_map.info}, "
        f"chosen for {solver_map.probe_schedule}",
        f"{len(solver_map.blocks)} block streams, {total} channels; solver mix (share of channels):",
        *(f"  {name:<20} {count / total:6.1%}" for name, count in sizes.most_common()),
    ]
    if other is not None:
        common = _common_blocks(solver_map, other)
        scores = [adjusted_rand(solver_map.blocks[k].labels, other.blocks[k].labels) for k in common]
        agree = [np.mean(solver_map.blocks[k].channel_choices() == other.blocks[k].channel_choices())
                 for k in common]
        if scores:
            lines.append(f"adjusted Rand index vs the second map over {len(common)} block streams: "
                         f"mean {np.mean(scores):.3f}, min {np.min(scores):.3f} "
                         "(above 0.8: the clusters hold)")
            lines.append(f"channels given the same predictor by both maps: mean {np.mean(agree):.1%}, "
                         f"min {np.min(agree):.1%} (the choices can hold where the clusters do not)")
        else:
            lines.append("the second map shares no block streams with this one")
    return "\n".join(lines)


def _common_blocks(solver_map: SolverMap, other: SolverMap) -> list[str]:
    return [k for k in solver_map.blocks
            if k in other.blocks and len(other.blocks[k].labels) == len(solver_map.blocks[k].labels)]


def _draw_strip(ax, solver_map: SolverMap) -> None:
    """One row per N: a square per step, dark where the model runs, light where HyCa predicts."""
    from matplotlib.colors import ListedColormap

    steps = run_steps(solver_map)
    masks = interval_masks(solver_map, steps)
    ax.imshow(np.stack(list(masks.values())), cmap=ListedColormap([PREDICTED, COMPUTED]), vmin=0, vmax=1,
              aspect="auto", interpolation="nearest")
    ax.set_xticks(np.arange(-0.5, steps), minor=True)
    ax.set_yticks(np.arange(-0.5, len(masks)), minor=True)
    ax.grid(which="minor", color="white", linewidth=1)
    ax.tick_params(which="minor", length=0)
    probed = solver_map.probe_schedule.interval
    ax.set_yticks(range(len(masks)), [f"N={n}" + (" (probe)" if n == probed else "") for n in masks])
    for row, mask in enumerate(masks.values()):
        saving = f"{speedup(mask):.2f}x fewer" if not mask.all() else "full compute"
        ax.text(steps - 0.3, row, f" {int(mask.sum())} computed, {saving}", va="center", fontsize=8)
    ax.set_xlim(-0.5, steps - 0.5)
    ax.set(title=f"which steps of a {steps}-step run the model computes (dark) and HyCa predicts (light)",
           xlabel="step")


def plot(solver_map: SolverMap, other: SolverMap | None = None) -> np.ndarray:
    """An RGB figure (H, W, 3) uint8: the run's computed and predicted steps with a plain summary on
    top; below, solver per block, probe errors per solver, indicators per cluster (or agreement)."""
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    keys = list(solver_map.blocks)
    names = sorted({n for b in solver_map.blocks.values() for n in _choice_names(b)})
    palette = matplotlib.colormaps["tab20"]
    colors = {n: palette(i % 20) for i, n in enumerate(names)}
    fig = Figure(figsize=(14, 17), dpi=80)
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(4, 2, height_ratios=[0.75, 0.75, 1, 1], width_ratios=[1.6, 1])
    _draw_strip(fig.add_subplot(grid[0, 0]), solver_map)
    for row, text in enumerate((plain_summary(solver_map), tuning_summary(solver_map))):
        ax = fig.add_subplot(grid[row, 1])
        ax.axis("off")
        ax.text(0, 0.5, "\n".join(textwrap.fill(line, 58) for line in text.splitlines()), fontsize=10,
                va="center")
    ax = fig.add_subplot(grid[1, 0])
    if tuning.from_info(solver_map.info):
        _draw_tuning(ax, solver_map)
    else:
        ax.axis("off")

    ax = fig.add_subplot(grid[2, 0])
    for x, key in enumerate(keys):
        block = solver_map.blocks[key]
        sizes = np.bincount(block.labels, minlength=block.clusters)
        bottom = 0
        for name, size in zip(_choice_names(block), sizes):
            ax.bar(x, size, bottom=bottom, color=colors[name], width=0.9)
            bottom += size
    ax.set(title="details: channels per cluster, coloured by its solver", xlabel="block stream",
           ylabel="channels")
    ax.legend(handles=[Patch(color=c, label=n) for n, c in colors.items()], fontsize=7)

    ax = fig.add_subplot(grid[2, 1])
    errors = np.stack([b.errors.min(axis=1).mean(axis=1) for b in solver_map.blocks.values()])  # (blocks, P)
    finite = np.isfinite(errors).all(axis=0)
    ax.boxplot(np.log10(np.maximum(errors[:, finite], 1e-12)),
               tick_labels=[s.name for s, f in zip(POOL, finite) if f])
    ax.set(title="probe error per solver (blocks; best time variable)", ylabel="log10 relative MSE")
    ax.tick_params(axis="x", rotation=45)

    ax = fig.add_subplot(grid[3, 0])
    indicators = np.concatenate([b.indicators for b in solver_map.blocks.values()])
    image = ax.imshow(indicators.T, aspect="auto", cmap="coolwarm", vmin=-2, vmax=2, interpolation="nearest")
    ax.set(title="standardized indicators per cluster (all blocks)", xlabel="cluster")
    ax.set_yticks(range(len(INDICATOR_NAMES)), INDICATOR_NAMES, fontsize=8)
    fig.colorbar(image, ax=ax)

    ax = fig.add_subplot(grid[3, 1])
    if other is not None:
        common = _common_blocks(solver_map, other)
        scores = [adjusted_rand(solver_map.blocks[k].labels, other.blocks[k].labels) for k in common]
        ax.bar(range(len(common)), scores)
        ax.axhline(0.8, color="red", linestyle="--")
        ax.set(title="adjusted Rand index vs second map", xlabel="block stream", ylim=(-0.1, 1.05))
    else:
        ax.axis("off")
        details = summary(solver_map).rsplit("\n\n", 1)[1]
        lines = [textwrap.shorten(line, 70) for line in details.splitlines()[:24]]
        ax.text(0, 0.5, "\n".join(lines), fontsize=8, family="monospace", va="center")
    for ax in fig.axes:
        ax.title.set_fontsize(10)
    fig.tight_layout()
    buffer = bytes_io.BytesIO()
    fig.savefig(buffer, format="png")
    return np.array(Image.open(buffer).convert("RGB"))


class HyCaSolverInspector(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="HyCaSolverInspector",
            display_name="HyCa Solver Inspector",
            category=CATEGORY,
            description=(
                "Shows what a solver map does to a run: which steps the model computes and which HyCa "
                "predicts, for each caching interval N, and the saving in block computations. Below, for "
                "experts: the solver per channel group of each block, every solver's probe error, the "
                "indicators of each group. Connect a second map (e.g. calibrated with a LoRA) to see how "
                "well the groupings agree."
            ),
            inputs=[
                SolverMapType.Input("solver_map", tooltip="The map to inspect."),
                SolverMapType.Input("compare_to", optional=True,
                                    tooltip="Optional second map: how well the groupings agree, per block."),
            ],
            outputs=[
                io.Image.Output(display_name="plot", tooltip="The plots, as an image."),
                io.String.Output(display_name="summary",
                                 tooltip="What the map does to a run, in words, then the details."),
            ],
        )

    @classmethod
    def execute(cls, solver_map, compare_to=None) -> io.NodeOutput:
        rgb = plot(solver_map, compare_to)
        image = torch.from_numpy(rgb.astype(np.float32) / 255.0)[None]
        return io.NodeOutput(image, summary(solver_map, compare_to))
