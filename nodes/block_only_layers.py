"""Layers whose output only the transformer blocks read, skipped on a model call that predicts every block.

Wan projects its time embedding to six modulation vectors for the blocks (``time_projection``, dim to 6 x dim
wide) at every model call. A predicted block reads only its input, so on a call that predicts every block
that output is never read; HyCa hands the model an uninitialized tensor of its shape instead. At Wan 2.1
1.3B width the projection reads 57 MB of weights per call, a third of what a predicted call still cost on
the CPU (the README's "At Wan 2.1 1.3B width"). Listed per exact class, each one's forward read to pass
the output to its blocks alone: Wan's subclasses (VACE, camera, S2V, ...) read it elsewhere too.
"""

from __future__ import annotations

import torch

from .run_constant_layers import LayerForward, wrap_forward
from .run_state import running_call

BLOCK_ONLY_LAYERS = {"comfy.ldm.wan.model.WanModel": ("time_projection",)}


class SkippedWhenPredicted(LayerForward):
    """A layer's forward that returns an uninitialized output of the right shape in a model call that
    predicts every block, and computes otherwise."""

    def __init__(self, forward, width: int):
        super().__init__(forward)
        self.width = width  # the output's last dimension

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        call = running_call()
        if call is not None and call.predicts_every_unit:
            return x.new_empty((*x.shape[:-1], self.width))
        return self.forward(x)


def add(patched) -> None:
    """Put a `SkippedWhenPredicted` on each such layer of the clone ``patched`` (replacing an earlier
    HyCa's)."""
    diffusion_model = patched.model.diffusion_model
    cls = type(diffusion_model)
    for name in BLOCK_ONLY_LAYERS.get(f"{cls.__module__}.{cls.__qualname__}", ()):
        layer = getattr(diffusion_model, name)
        width = [m for m in layer.modules() if isinstance(m, torch.nn.Linear)][-1].out_features
        wrap_forward(patched, f"diffusion_model.{name}.forward",
                     lambda forward, width=width: SkippedWhenPredicted(forward, width))
