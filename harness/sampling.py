"""Sampling through ComfyUI's own entry point (the one KSampler uses)."""

from __future__ import annotations

import torch


def flux_conditioning(context_dim: int, pooled_dim: int, tokens: int = 8, seed: int = 0):
    """A positive/negative conditioning pair in ComfyUI's format for FLUX-family models."""
    generator = torch.Generator().manual_seed(seed)

    def cond():
        context = torch.randn(1, tokens, context_dim, generator=generator)
        return [[context, {"pooled_output": torch.randn(1, pooled_dim, generator=generator)}]]

    return cond(), cond()


def text_conditioning(context_dim: int, tokens: int = 8, seed: int = 0, pooled_dim: int | None = None,
                      attention_mask: bool = False, **extra):
    """A positive/negative pair as a text encoder node outputs it, for any text-conditioned family.

    ``context`` (1, tokens, context_dim) is the encoder's hidden states; ``pooled_dim`` adds a
    ``pooled_output`` (None when the family's encoder has none, as for T5-only Chroma); with
    ``attention_mask`` the entry holds an integer token mask whose last quarter is padding (what
    the T5/LLaMA encoders of LTX-Video and HunyuanVideo return). ``extra`` entries (guidance,
    reference_latents, clip_vision_output, concat_latent_image ...) go into both conditionings.
    """
    generator = torch.Generator().manual_seed(seed)

    def cond():
        pooled = None if pooled_dim is None else torch.randn(1, pooled_dim, generator=generator)
        options = {"pooled_output": pooled}
        if attention_mask:
            mask = torch.ones(1, tokens, dtype=torch.long)
            mask[:, tokens - tokens // 4:] = 0
            options["attention_mask"] = mask
        options.update(extra)
        return [[torch.randn(1, tokens, context_dim, generator=generator), options]]

    return cond(), cond()


def with_entries(conditioning, **entries):
    """A copy of a conditioning with entries added to every item (ComfyUI's conditioning_set_values)."""
    return [[context, {**options, **entries}] for context, options in conditioning]


def clip_vision_output(tokens: int = 4, width: int = 1280, seed: int = 0):
    """What CLIPVisionEncode outputs, reduced to what Wan image-to-video reads: the penultimate hidden
    states (ViT-H width 1280; a real encoder gives 257 tokens)."""
    import comfy.clip_vision

    output = comfy.clip_vision.Output()
    generator = torch.Generator().manual_seed(seed)
    output["penultimate_hidden_states"] = torch.randn(1, tokens, width, generator=generator)
    return output


def sample(model, positive, negative, latent: torch.Tensor, steps: int = 20, cfg: float = 1.0,
           sampler: str = "euler", scheduler: str = "simple", seed: int = 0, denoise: float = 1.0,
           noise_mask: torch.Tensor | None = None):
    """``comfy.sample.sample`` with noise prepared as KSampler prepares it (``noise_mask``: the latent's
    ``noise_mask``, as KSampler passes it)."""
    import comfy.sample

    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(
        model, noise, steps, cfg, sampler, scheduler, positive, negative, latent,
        denoise=denoise, disable_pbar=True, seed=seed, noise_mask=noise_mask,
    )


def class_samples(conditioning, unconditional, empty_latent, model, labels, seed: int = 0, steps: int = 30,
                  cfg: float = 1.0, sampler: str = "euler", scheduler: str = "simple") -> torch.Tensor:
    """One latent per class label of a reference model, sampled through ``comfy.sample.sample`` against
    its negative: each reference module binds its ``conditioning``, ``unconditional`` and
    ``empty_latent`` (and its recommended steps and cfg) as its ``sample``."""
    labels = list(labels)
    return sample(model, conditioning(labels), unconditional(len(labels)), empty_latent(len(labels)),
                  steps=steps, cfg=cfg, sampler=sampler, scheduler=scheduler, seed=seed)


def probe_map(pack, model, conditioning, latent_shape, interval, warmup, steps=12, sampler="euler",
              granularity="block"):
    """HyCa Calibrate's probe (seed 0, cfg 1, simple scheduler) on a zero latent: the solver map."""
    schedule = pack.hyca_core.schedule.Schedule(interval=interval, warmup=warmup)
    solver_map, _ = pack.nodes.calibrate_node.probe(model, 0, steps, 1.0, sampler, "simple", *conditioning,
                                                    {"samples": torch.zeros(latent_shape)}, schedule,
                                                    granularity=granularity)
    return solver_map
