"""HyCa on a tiny real ComfyUI model of every DiT family ComfyUI runs with block patches.

Each family is built from the unet_config ComfyUI's model detection infers for it (shrunk), given
the conditioning its ``extra_conds`` reads, and sampled through ComfyUI's sampler: the patches land
on and run for every block, N=1 is bit-identical, a calibrated map at N=3 computes exactly the
scheduled block calls and stays close to full compute. Families without block patches are refused.
"""

import logging
import re
from dataclasses import dataclass
from typing import Callable

import pytest
import torch

from harness import sampling, tiny_models
from harness.metrics import latent_psnr

STEPS = 10
INTERVAL, WARMUP = 3, 3


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _first_frame_kept(shape):
    """A video mask (1, 1, T, H, W) that is 0 on the first latent frame (keep it), 1 elsewhere."""
    mask = torch.ones(1, 1, *shape[2:])
    mask[:, :, 0] = 0.0
    return mask


@dataclass
class Family:
    config: dict
    detected: str  # the comfy.supported_models class ComfyUI picks for the config, as for the checkpoint
    conditioning: Callable[[], tuple]  # () -> (positive, negative)
    latent: tuple  # empty latent shape (as the family's Empty*Latent node makes it)
    psnr: float  # lower bound at N=3: measured on this tiny model, less 5 dB of margin
    cfg: float = 1.0  # above 1, cond and uncond run as one batch of 2 (or two calls if they cannot batch)
    calls_per_step: int = 1  # model calls per sampler step (2 when cond and uncond cannot batch)
    image: bool = False  # the latent holds an encoded first frame that noise_mask keeps (ti2v)
    tokens: set | None = None  # image-stream token counts the first block must see, where not plain


def _text(dim, **kwargs):
    return lambda: sampling.text_conditioning(dim, **kwargs)


def _qwen_edit():
    positive, negative = sampling.text_conditioning(32)
    # TextEncodeQwenImageEdit / ReferenceLatent: the edited image's latent, here at another size, so
    # the model's token sequence grows by its 6x6 patches; the negative has none, so cond and uncond
    # cannot share a batch and every step runs two model calls, two branches of HyCa's state.
    return sampling.with_entries(positive, reference_latents=[_randn(1, 16, 1, 12, 12, seed=3)]), negative


def _wan_i2v():
    # WanImageToVideo: the start image's latent with a mask keeping its frame, and its CLIP vision output.
    image = _randn(1, 16, 2, 16, 16, seed=3)
    return sampling.text_conditioning(32, clip_vision_output=sampling.clip_vision_output(),
                                      concat_latent_image=image, concat_mask=_first_frame_kept(image.shape))


FAMILIES = {
    "flux-dev": Family(tiny_models.FLUX_DEV, "Flux", _text(32, pooled_dim=16, guidance=3.5),
                       (1, 16, 16, 16), psnr=59),
    "flux-schnell": Family(tiny_models.FLUX_SCHNELL, "FluxSchnell",
                           lambda: sampling.flux_conditioning(32, 16), (1, 16, 16, 16), psnr=64),
    "chroma": Family(tiny_models.CHROMA, "Chroma", _text(32), (1, 16, 16, 16), psnr=51, cfg=3.0),
    "qwen-image": Family(tiny_models.QWEN_IMAGE, "QwenImage", _text(32), (1, 16, 1, 16, 16), psnr=62,
                         cfg=2.5),
    "qwen-image-edit": Family(tiny_models.QWEN_IMAGE, "QwenImage", _qwen_edit, (1, 16, 1, 16, 16), psnr=61,
                              cfg=2.5, calls_per_step=2, tokens={64 + 36, 64}),
    "hunyuan-video": Family(tiny_models.HUNYUAN_VIDEO, "HunyuanVideo",
                            _text(32, pooled_dim=768, attention_mask=True, guidance=6.0), (1, 16, 2, 16, 16),
                            psnr=58),
    "wan2.1-t2v": Family(tiny_models.WAN21_T2V, "WAN21_T2V", _text(32), (1, 16, 2, 16, 16), psnr=53, cfg=5.0),
    "wan2.1-i2v": Family(tiny_models.WAN21_I2V, "WAN21_I2V", _wan_i2v, (1, 16, 2, 16, 16), psnr=53, cfg=5.0),
    "wan2.2-ti2v-5b": Family(tiny_models.WAN22_TI2V, "WAN22_T2V", _text(32), (1, 48, 2, 16, 16), psnr=62,
                             cfg=5.0, image=True),
    "ltxv": Family(tiny_models.LTXV, "LTXV", _text(32, attention_mask=True, frame_rate=25), (1, 128, 2, 8, 8),
                   psnr=53, cfg=3.0),
    "sd3": Family(tiny_models.SD3, "SD3", _text(32, pooled_dim=32), (1, 16, 16, 16), psnr=52, cfg=4.5),
    "sd3.5": Family(tiny_models.SD35, "SD3", _text(32, pooled_dim=32), (1, 16, 16, 16), psnr=53, cfg=4.5),
    "auraflow": Family(tiny_models.AURAFLOW, "AuraFlow", _text(2048), (1, 4, 16, 16), psnr=75, cfg=3.5),
}


def _logged_counts(text):
    found = re.findall(r"(\d+) block calls computed, (\d+) predicted", text)
    return tuple(int(x) for x in found[-1]) if found else None


class _CountingPatch:
    """Wraps one block's HyCa patch; tells computed from predicted calls by the run state's counter."""

    def __init__(self, patch, state_key):
        self.patch, self.state_key = patch, state_key
        self.computed = self.predicted = 0
        self.shapes = set()  # (batch, tokens) of the image stream

    def __call__(self, args, extra):
        state = args["transformer_options"].get(self.state_key)
        before = state.predicted if state is not None else 0
        self.shapes.add(tuple(args["img"].shape[:2]))
        out = self.patch(args, extra)
        if state is not None and state.predicted > before:
            self.predicted += 1
        else:
            self.computed += 1
        return out


def _count_block_calls(pack, patched):
    replaced = patched.model_options["transformer_options"]["patches_replace"]["dit"]
    state_key = pack.nodes.run_state.OPTIONS_KEY
    counters = {key: _CountingPatch(patch, state_key) for key, patch in replaced.items()}
    replaced.update(counters)
    return counters


def _calls(counters):
    return {key: (c.computed, c.predicted) for key, c in counters.items()}


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family(pack, name, caplog):
    family = FAMILIES[name]
    model = tiny_models.build(family.config, seed=1)
    assert type(model.model.model_config).__name__ == family.detected
    blocks = pack.nodes.families.patchable_blocks(model.model.diffusion_model)
    positive, negative = family.conditioning()
    latent = torch.zeros(family.latent)
    noise_mask = None
    if family.image:  # Wan22ImageToVideoLatent: the image's latent in frame 0, kept by the noise mask
        latent[:, :, 0] = _randn(*family.latent[:2], *family.latent[3:], seed=4)
        noise_mask = _first_frame_kept(family.latent)

    def run(m, steps=STEPS):
        return sampling.sample(m, positive, negative, latent, steps=steps, cfg=family.cfg, seed=5,
                               noise_mask=noise_mask)

    full = run(model)
    assert torch.isfinite(full).all()

    Schedule = pack.hyca_core.schedule.Schedule
    apply_hyca = pack.nodes.apply_hyca.apply_hyca
    latent_input = {"samples": latent} | ({} if noise_mask is None else {"noise_mask": noise_mask})
    solver_map, probed = pack.nodes.calibrate_node.probe(model, 5, STEPS, family.cfg, "euler", "simple",
                                                         positive, negative, latent_input, Schedule(3, 3))
    assert {key.rsplit(".", 1)[0] for key in solver_map.blocks} == {block.name for block in blocks}
    assert torch.equal(probed["samples"], full)  # recording leaves the probe at full compute

    # 1. one patch per block, each called at every model call of the run
    patched = apply_hyca(model, solver_map, Schedule(interval=1, warmup=WARMUP))
    replaced = patched.model_options["transformer_options"]["patches_replace"]["dit"]
    assert set(replaced) == {(block.block_type, block.index) for block in blocks}
    counters = _count_block_calls(pack, patched)
    # 2. N=1 is the unpatched model, bit for bit
    assert torch.equal(run(patched), full)
    assert _calls(counters) == {key: (STEPS * family.calls_per_step, 0) for key in counters}
    batch = 2 if family.cfg > 1 and family.calls_per_step == 1 else 1  # CFG: cond and uncond in one batch
    assert {b for c in counters.values() for b, _ in c.shapes} == {batch}
    if family.tokens:
        assert {t for _, t in counters[(blocks[0].block_type, 0)].shapes} == family.tokens

    # 3. N=3: the scheduled steps computed, the others predicted, in every block and every branch
    schedule = Schedule(interval=INTERVAL, warmup=WARMUP)
    computed_steps = int(schedule.mask(STEPS).sum())
    patched = apply_hyca(model, solver_map, schedule)
    counters = _count_block_calls(pack, patched)
    with caplog.at_level(logging.INFO):
        out = run(patched)
    computed = computed_steps * family.calls_per_step
    predicted = (STEPS - computed_steps) * family.calls_per_step
    assert _calls(counters) == {key: (computed, predicted) for key in counters}
    assert _logged_counts(caplog.text) == (computed * len(blocks), predicted * len(blocks))

    # 4. close to full compute, but not equal to it: caching really happened; and closer than sampling
    # with fewer steps at the same compute (a bound that skipping the predicted blocks would not meet)
    cached, fewer = latent_psnr(out, full), latent_psnr(run(model, steps=computed_steps), full)
    logging.getLogger(__name__).info(
        "%s: PSNR %.1f dB at N=%d (%d steps: %.1f dB); %d blocks, per block %d calls computed, %d predicted",
        name, cached, INTERVAL, computed_steps, fewer, len(blocks), computed, predicted)
    assert not torch.equal(out, full)
    assert cached > family.psnr, f"{name}: PSNR {cached:.1f} dB"
    assert cached > fewer + 3, f"{name}: PSNR {cached:.1f} dB, {computed_steps} full steps {fewer:.1f} dB"


UNSUPPORTED = {  # name: (config, diffusion model class)
    "lumina2": (tiny_models.LUMINA2, "NextDiT"),
    "hidream": (tiny_models.HIDREAM, "HiDreamImageTransformer2DModel"),
    "sd1.5-unet": (tiny_models.SD15_UNET, "UNetModel"),
}


@pytest.mark.parametrize("name", list(UNSUPPORTED))
def test_family_without_block_patches_is_refused(pack, name):
    config, class_name = UNSUPPORTED[name]
    model = tiny_models.build(config, seed=1)
    Schedule = pack.hyca_core.schedule.Schedule
    positive, negative = sampling.text_conditioning(32)
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    attempts = (
        lambda: pack.nodes.patching.with_hyca(model, pack.nodes.run_state.RunState()),
        lambda: pack.nodes.apply_hyca.apply_hyca(model, None, Schedule(interval=3, warmup=3)),
        lambda: pack.nodes.calibrate_node.probe(model, 0, STEPS, 1.0, "euler", "simple", positive, negative,
                                                latent, Schedule(interval=3, warmup=3)),
    )
    for attempt in attempts:
        message = f"HyCa cannot patch {class_name}: ComfyUI offers no transformer-block patches"
        with pytest.raises(pack.nodes.families.UnsupportedModel, match=message):
            attempt()
    assert "patches_replace" not in model.model_options["transformer_options"]


@pytest.mark.parametrize("name", ["lumina2", "sd1.5-unet"])  # HiDream needs its four text encoders' outputs
def test_family_without_block_patches_runs_at_whole_model_granularity(pack, name, caplog):
    config, _ = UNSUPPORTED[name]
    model = tiny_models.build(config, seed=1)
    Schedule = pack.hyca_core.schedule.Schedule
    positive, negative = sampling.text_conditioning(32)
    channels = model.model.latent_format.latent_channels
    latent = torch.zeros(1, channels, 8, 8)
    solver_map, _ = pack.nodes.calibrate_node.probe(model, 0, STEPS, 1.0, "euler", "simple", positive,
                                                    negative, {"samples": latent},
                                                    Schedule(interval=3, warmup=3), granularity="model")
    apply = pack.nodes.apply_hyca.apply_hyca
    full = sampling.sample(model, positive, negative, latent, steps=STEPS, seed=2)
    same = sampling.sample(apply(model, solver_map, Schedule(interval=1, warmup=3), granularity="model"),
                           positive, negative, latent, steps=STEPS, seed=2)
    assert torch.equal(same, full)
    with caplog.at_level(logging.INFO):
        out = sampling.sample(apply(model, solver_map, Schedule(interval=3, warmup=3), granularity="model"),
                              positive, negative, latent, steps=STEPS, seed=2)
    computed = int(Schedule(interval=3, warmup=3).mask(STEPS).sum())
    assert _logged_counts(caplog.text) == (computed, STEPS - computed)
    assert not torch.equal(out, full) and torch.isfinite(out).all()
