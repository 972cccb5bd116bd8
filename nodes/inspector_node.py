"""HyCa Solver Inspector: what a solver map chose, why, and whether another map agrees."""

from __future__ import annotations

import io as bytes_io
import textwrap
from collections import Counter

import matplotlib

matplotlib.use("Agg")  # no display on servers; must precede pyplot
import matplotlib.pyplot as plt
import numpy as np
import torch
from comfy_api.latest import io
from PIL import Image

from ..hyca_core.clustering import adjusted_rand
from ..hyca_core.indicators import INDICATOR_NAMES
from ..hyca_core.solver_map import SolverMap
from ..hyca_core.solvers import POOL, TIME_VARIABLES, solver
from .types import CATEGORY, SolverMapType


def _choice_names(block) -> list[str]:
    return [f"{solver(int(s)).name}/{TIME_VARIABLES[int(v)]}" for s, v in zip(block.solver, block.variable)]


def summary(solver_map: SolverMap, other: SolverMap | None = None) -> str:
    """Plain-text report: model, probe, solver mix, and the agreement with ``other`` if given."""
    sizes = Counter()
    for block in solver_map.blocks.values():
        for name, size in zip(_choice_names(block), np.bincount(block.labels, minlength=block.clusters)):
            sizes[name] += int(size)
    total = sum(sizes.values())
    lines = [
        f"HyCa solver map for {solver_map.architecture}",
        f"probe: {len(solver_map.probe_sigmas)} steps, {solver_map.info}, chosen for {solver_map.probe_schedule}",
        f"{len(solver_map.blocks)} block streams, {total} channels; solver mix (share of channels):",
        *(f"  {name:<20} {count / total:6.1%}" for name, count in sizes.most_common()),
    ]
    if other is not None:
        common = [k for k in solver_map.blocks if k in other.blocks
                  and len(other.blocks[k].labels) == len(solver_map.blocks[k].labels)]
        scores = [adjusted_rand(solver_map.blocks[k].labels, other.blocks[k].labels) for k in common]
        if scores:
            lines.append(f"adjusted Rand index vs the second map over {len(common)} block streams: "
                         f"mean {np.mean(scores):.3f}, min {np.min(scores):.3f} (above 0.8: the map still fits)")
        else:
            lines.append("the second map shares no block streams with this one")
    return "\n".join(lines)


def plot(solver_map: SolverMap, other: SolverMap | None = None) -> np.ndarray:
    """An RGB figure (H, W, 3) uint8: solver per block, probe errors per solver, indicators per cluster."""
    keys = list(solver_map.blocks)
    names = sorted({n for b in solver_map.blocks.values() for n in _choice_names(b)})
    colors = {n: plt.cm.tab20(i % 20) for i, n in enumerate(names)}
    fig, axes = plt.subplots(2, 2, figsize=(14, 9), dpi=80)
    ax = axes[0, 0]
    for x, key in enumerate(keys):
        block = solver_map.blocks[key]
        sizes = np.bincount(block.labels, minlength=block.clusters)
        bottom = 0
        for name, size in zip(_choice_names(block), sizes):
            ax.bar(x, size, bottom=bottom, color=colors[name], width=0.9)
            bottom += size
    ax.set(title="channels per cluster, coloured by its solver", xlabel="block stream", ylabel="channels")
    ax.legend(handles=[matplotlib.patches.Patch(color=c, label=n) for n, c in colors.items()], fontsize=7)

    ax = axes[0, 1]
    errors = np.stack([b.errors.min(axis=1).mean(axis=1) for b in solver_map.blocks.values()])  # (blocks, P)
    finite = np.isfinite(errors).all(axis=0)
    ax.boxplot(np.log10(np.maximum(errors[:, finite], 1e-12)), tick_labels=[s.name for s, f in zip(POOL, finite) if f])
    ax.set(title="probe error per solver (blocks; best time variable)", ylabel="log10 relative MSE")
    ax.tick_params(axis="x", rotation=45)

    ax = axes[1, 0]
    indicators = np.concatenate([b.indicators for b in solver_map.blocks.values()])
    image = ax.imshow(indicators.T, aspect="auto", cmap="coolwarm", vmin=-2, vmax=2, interpolation="nearest")
    ax.set(title="standardized indicators per cluster (all blocks)", xlabel="cluster")
    ax.set_yticks(range(len(INDICATOR_NAMES)), INDICATOR_NAMES, fontsize=8)
    fig.colorbar(image, ax=ax)

    ax = axes[1, 1]
    if other is not None:
        common = [k for k in keys if k in other.blocks and len(other.blocks[k].labels) == len(solver_map.blocks[k].labels)]
        ax.bar(range(len(common)), [adjusted_rand(solver_map.blocks[k].labels, other.blocks[k].labels) for k in common])
        ax.axhline(0.8, color="red", linestyle="--")
        ax.set(title="adjusted Rand index vs second map", xlabel="block stream", ylim=(-0.1, 1.05))
    else:
        ax.axis("off")
        lines = [textwrap.shorten(line, 70) for line in summary(solver_map).splitlines()[:24]]
        ax.text(0, 0.5, "\n".join(lines), fontsize=8, family="monospace", va="center")
    for ax in axes.flat:
        ax.title.set_fontsize(10)
    fig.tight_layout()
    buffer = bytes_io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return np.array(Image.open(buffer).convert("RGB"))


class HyCaSolverInspector(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="HyCaSolverInspector",
            display_name="HyCa Solver Inspector",
            category=CATEGORY,
            description=(
                "Shows what a solver map chose: cluster sizes and solver per block, every solver's probe "
                "error, the indicators of each cluster. Connect a second map (e.g. calibrated with a LoRA) "
                "to see how well the clusterings agree."
            ),
            inputs=[
                SolverMapType.Input("solver_map", tooltip="The map to inspect."),
                SolverMapType.Input("compare_to", optional=True,
                                    tooltip="Optional second map; the adjusted Rand index per block is reported."),
            ],
            outputs=[
                io.Image.Output(display_name="plot", tooltip="The plots, as an image."),
                io.String.Output(display_name="summary", tooltip="A text summary of the map."),
            ],
        )

    @classmethod
    def execute(cls, solver_map, compare_to=None) -> io.NodeOutput:
        rgb = plot(solver_map, compare_to)
        image = torch.from_numpy(rgb.astype(np.float32) / 255.0)[None]
        return io.NodeOutput(image, summary(solver_map, compare_to))
