"""The Solver Inspector on real probe maps: plot, summary, and two probes' clusterings and choices
compared."""

import re
from dataclasses import replace

import numpy as np
import pytest



def test_inspector_plots_and_summarizes_and_compares(pack, flux, solver_map, conditioning, latent, steps):
    inspector = pack.nodes.inspector_node.HyCaSolverInspector
    image, text = inspector.execute(solver_map).result
    assert image.ndim == 4 and image.shape[0] == 1 and image.shape[-1] == 3
    assert image.shape[1] > 300 and image.shape[2] > 500 and 0 <= float(image.min()) < float(image.max()) <= 1
    assert solver_map.architecture in text and "solver mix" in text
    # a map from another probe seed of the same model: clusterings compared block by block
    schedule = pack.hyca_core.schedule.Schedule(interval=4, warmup=3)
    other, _ = pack.nodes.calibrate_node.probe(flux, 1, steps, 1.0, "euler", "simple", *conditioning,
                                               {"samples": latent}, schedule)
    _, compared = inspector.execute(solver_map, other).result
    assert "adjusted Rand index vs the second map over 6 block streams" in compared
    agreement = _agreement(compared)
    expected = [np.mean(solver_map.blocks[k].channel_choices() == other.blocks[k].channel_choices())
                for k in solver_map.blocks]
    assert agreement == pytest.approx((100 * np.mean(expected), 100 * np.min(expected)), abs=0.05)
    _, same = inspector.execute(solver_map, solver_map).result
    assert "mean 1.000, min 1.000" in same and _agreement(same) == (100.0, 100.0)


def _agreement(text: str) -> tuple[float, float]:
    """(mean, min) percent of the summary's same-predictor line."""
    line = next(line for line in text.splitlines() if line.startswith("channels given the same predictor"))
    mean, low = re.findall(r"([0-9.]+)%", line)
    return float(mean), float(low)


def test_channel_choices_follow_the_clusters_not_their_numbering(solver_map):
    """Two maps that number the same clusters differently give every channel the same predictor."""
    block = next(iter(solver_map.blocks.values()))
    order = np.arange(block.clusters)[::-1]
    renumbered = replace(block, labels=order[block.labels], solver=block.solver[order],
                         variable=block.variable[order])
    assert (renumbered.channel_choices() == block.channel_choices()).all()
    assert block.channel_choices().shape == block.labels.shape
