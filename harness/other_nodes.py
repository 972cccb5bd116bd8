"""ComfyUI's own nodes that patch or call the model a second time, as a graph chains them with HyCa."""

from __future__ import annotations


def skip_layer_guidance(model, end_percent: float = 1.0, scale: float = 3.0, double_layers: str = "0"):
    """Skip Layer Guidance (DiT): after CFG, a second conditional pass with these layers skipped, at every
    step's sigma from the start of the denoising to ``end_percent``."""
    from comfy_extras.nodes_slg import SkipLayerGuidanceDiT

    return SkipLayerGuidanceDiT.execute(model, scale=scale, start_percent=0.0, end_percent=end_percent,
                                        double_layers=double_layers, single_layers="")[0]


def skip_layer_guidance_simple(model, end_percent: float, double_layers: str = "0"):
    """Its simple variant: the unconditional pass with these layers skipped, up to ``end_percent``."""
    from comfy_extras.nodes_slg import SkipLayerGuidanceDiTSimple

    return SkipLayerGuidanceDiTSimple.execute(model, start_percent=0.0, end_percent=end_percent,
                                              double_layers=double_layers, single_layers="")[0]


def scheduler_sigmas(model, steps: int, scheduler: str = "simple"):
    """The sigmas ComfyUI's BasicScheduler node gives for a full denoise."""
    from comfy_extras.nodes_custom_sampler import BasicScheduler

    return BasicScheduler.execute(model, scheduler, steps, 1.0)[0]
