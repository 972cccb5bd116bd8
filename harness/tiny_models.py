"""Tiny instances of ComfyUI's real DiT classes, with seeded weights, wrapped in a real ModelPatcher.

ComfyUI builds layers without initializing them (weights normally come from a file), so a model
made from a config holds garbage until :func:`initialize` fills it.
"""

from __future__ import annotations

import torch

from . import comfy_runtime

# unet_config dicts as comfy.model_detection would infer them from a checkpoint, shrunk.
FLUX = dict(
    image_model="flux", in_channels=16, out_channels=16, patch_size=2, hidden_size=64,
    context_in_dim=32, vec_in_dim=16, mlp_ratio=4.0, num_heads=4, depth=2, depth_single_blocks=2,
    axes_dim=[4, 6, 6], theta=10000, qkv_bias=True, guidance_embed=False,
)
# one double and one single block: every FLUX code path at the least compute
FLUX_SMALLEST = dict(FLUX, depth=1, depth_single_blocks=1)

# One config per DiT family ComfyUI runs with ``dit`` block patches. Each holds the keys
# comfy.model_detection.detect_unet_config infers for that family (so model_config_from_unet_config
# picks the same supported_models class as for the real checkpoint), with sizes shrunk, plus the
# constructor sizes detection leaves at their full-size defaults (text widths, head counts...).
# Widths are 64 everywhere but SD3, whose MMDiT fixes hidden = 64 * depth.

# FLUX.1 dev: guidance_in present -> supported_models.Flux (ModelType.FLUX, guidance distilled).
FLUX_DEV = dict(FLUX, guidance_embed=True, depth=1, depth_single_blocks=1)
# FLUX.1 schnell: no guidance_in -> supported_models.FluxSchnell (ModelType.FLOW).
FLUX_SCHNELL = dict(FLUX, depth=1, depth_single_blocks=1)
# Chroma: distilled_guidance_layer -> image_model "chroma"; in_dim is the approximator's input
# (16 timestep + 16 guidance + 32 modulation-index features), out_dim the model width.
CHROMA = dict(
    image_model="chroma", in_channels=64, out_channels=64, patch_size=2, hidden_size=64, context_in_dim=32,
    num_heads=4, depth=1, depth_single_blocks=1, axes_dim=[4, 6, 6], theta=10000, mlp_ratio=4.0,
    qkv_bias=True, in_dim=64, out_dim=64, hidden_dim=64, n_layers=2,
)
# Qwen-Image (and Qwen-Image-Edit, the same model given reference latents): txt_norm -> "qwen_image".
QWEN_IMAGE = dict(
    image_model="qwen_image", in_channels=64, num_layers=2,
    attention_head_dim=16, num_attention_heads=4, joint_attention_dim=32, axes_dims_rope=(4, 6, 6),
)
# HunyuanVideo (T2V): vector_in present (vec_in_dim 768, CLIP-L pooled), guidance_in present.
HUNYUAN_VIDEO = dict(
    image_model="hunyuan_video", in_channels=16, out_channels=16, patch_size=[1, 2, 2], vec_in_dim=768,
    axes_dim=[4, 6, 6], meanflow=False, context_in_dim=32, hidden_size=64, mlp_ratio=4.0, num_heads=4,
    depth=1, depth_single_blocks=1, theta=256, qkv_bias=True, byt5=False, guidance_embed=True,
    use_cond_type_embedding=False, vision_in_dim=None,
)
# Wan 2.1 text-to-video: head.modulation -> "wan2.1", no img_emb -> model_type "t2v".
WAN21_T2V = dict(
    image_model="wan2.1", model_type="t2v", dim=64, ffn_dim=128, num_heads=4, num_layers=2, in_dim=16,
    out_dim=16, patch_size=(1, 2, 2), freq_dim=256, window_size=(-1, -1), qk_norm=True, cross_attn_norm=True,
    eps=1e-6, text_dim=32,
)
# Wan 2.1 image-to-video: img_emb (CLIP vision, width 1280) -> "i2v"; 16 noise + 4 mask + 16 image channels.
WAN21_I2V = dict(WAN21_T2V, model_type="i2v", in_dim=36)
# Wan 2.2 TI2V 5B: out_dim 48 -> supported_models.WAN22_T2V (model_base.WAN22, Wan 2.2 VAE latents).
WAN22_TI2V = dict(WAN21_T2V, in_dim=48, out_dim=48)
# LTX-Video: adaln_single -> "ltxv"; 128-channel latents, patch size 1; cross_attention_dim = width.
LTXV = dict(
    image_model="ltxv", num_layers=2, attention_head_dim=16, num_attention_heads=4, cross_attention_dim=64,
    caption_channels=32,
)
# SD3 medium (MMDiT): joint_blocks -> supported_models.SD3. The last joint block is context_pre_only.
SD3 = dict(
    in_channels=16, out_channels=16, patch_size=2, depth=2, input_size=None, adm_in_channels=32,
    context_embedder_config={"target": "torch.nn.Linear", "params": {"in_features": 32, "out_features": 128}},
    num_patches=256, pos_embed_max_size=16, pos_embed_scaling_factor=None, x_block_self_attn_layers=[],
)
# SD3.5 medium (MMDiT-X): RMS q/k norms and a second self-attention in the first x blocks.
SD35 = dict(SD3, qk_norm="rms", x_block_self_attn_layers=[0])
# AuraFlow: double_layers -> supported_models.AuraFlow, which requires cond_seq_dim 2048 (Pile-T5).
AURAFLOW = dict(
    max_seq=256, cond_seq_dim=2048, n_double_layers=1, n_layers=2, dim=64, n_heads=4, global_conddim=64,
)

# Families whose forward offers no ``dit`` block patches (HyCa must refuse them).
# Lumina 2 (cap_embedder -> "lumina2").
LUMINA2 = dict(
    image_model="lumina2", patch_size=2, in_channels=16, dim=64, cap_feat_dim=32, n_layers=1, qk_norm=True,
    n_heads=4, n_kv_heads=4, axes_dims=[4, 6, 6], axes_lens=[300, 512, 512], rope_theta=10000.0,
    ffn_dim_multiplier=4.0,
)
# HiDream-I1 (caption_projection -> "hidream"; detection fills every size with the full model's).
HIDREAM = dict(
    image_model="hidream", in_channels=16, out_channels=16, patch_size=2, attention_head_dim=16,
    num_attention_heads=4, axes_dims_rope=[8, 4, 4], caption_channels=[32, 32], text_emb_dim=32,
    llama_layers=[0, 1], max_resolution=[16, 16], num_routed_experts=2, num_activated_experts=1,
    num_layers=1, num_single_layers=1,
)
# SD1.5 UNet: supported_models.SD15 requires model_channels 320 and context_dim 768, so this one is
# wide (11M parameters); one level, one res block, no transformers keep it quick to build.
SD15_UNET = dict(
    use_checkpoint=False, image_size=32, use_spatial_transformer=True, legacy=False, adm_in_channels=None,
    in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[1], channel_mult=[1],
    transformer_depth=[0], transformer_depth_output=[0, 0], transformer_depth_middle=-2, context_dim=768,
    use_linear_in_transformer=False, use_temporal_resblock=False, use_temporal_attention=False,
)


def initialize(module: torch.nn.Module, seed: int) -> None:
    """Seeded standard initialization: PyTorch's defaults for linear/conv layers, ones for norm scales,
    small normal values for other parameters and for buffers a checkpoint would provide."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        touched = set()
        for sub in module.modules():
            for cls in (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d,
                        torch.nn.Embedding):
                if isinstance(sub, cls):
                    cls.reset_parameters(sub)
                    touched.update(id(p) for p in sub.parameters(recurse=False))
        for name, param in module.named_parameters():
            if id(param) in touched:
                continue
            with torch.no_grad():
                if name.endswith(("scale", "weight")):
                    param.fill_(1.0)  # norm gains
                else:
                    param.normal_(0.0, 0.02)
        # Buffers saved in the state dict come from the checkpoint too (SD3's pos_embed).
        saved = module.state_dict(keep_vars=True)
        for name, buffer in module.named_buffers():
            if name in saved and buffer.is_floating_point():
                with torch.no_grad():
                    buffer.normal_(0.0, 0.02)
    finally:
        torch.random.set_rng_state(generator_state)


def build(unet_config: dict, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A real ComfyUI ModelPatcher around a tiny model of the given architecture, its weights in ``dtype``."""
    comfy_runtime.load()
    import comfy.model_detection
    import comfy.model_management
    import comfy.model_patcher

    model_config = comfy.model_detection.model_config_from_unet_config(dict(unet_config))
    if model_config is None:
        raise ValueError(f"ComfyUI recognizes no model family for {unet_config}")
    model_config.set_inference_dtype(dtype, None)
    model = model_config.get_model({}, "")
    initialize(model.diffusion_model, seed)
    device = comfy.model_management.get_torch_device()
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=torch.device("cpu"))
