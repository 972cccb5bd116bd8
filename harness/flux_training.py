"""A differentiable forward of ComfyUI's FLUX (``comfy.ldm.flux.model.Flux``) for training.

ComfyUI's FLUX blocks add their residuals in place (``img += ...``), which autograd rejects: the
tensor a LayerNorm saved for its backward is overwritten. :func:`out_of_place_options` returns
``transformer_options`` whose ``dit`` block replacements (the hook ComfyUI's own forward offers,
as HyCa's nodes use it) run each block's math with out-of-place adds, through the block's own
layers; everything outside the blocks stays ComfyUI's code. Attention is PyTorch's SDPA (ComfyUI
picks sub-quadratic attention on CPU; same math, faster there). The result equals ComfyUI's
forward on the same weights (checked by :func:`check_matches_comfy` and the tests).
"""

from __future__ import annotations

import torch


def _attention(q, k, v, pe):
    from comfy.ldm.flux.math import apply_rope
    from comfy.ldm.modules.attention import attention_pytorch

    q, k = apply_rope(q, k, pe)
    return attention_pytorch(q, k, v, q.shape[1], skip_reshape=True)


def _heads(attn, x, num_heads):
    """q, k, v (B, heads, L, head_dim) of ``x`` through a FLUX SelfAttention's qkv and q/k norms."""
    q, k, v = attn.qkv(x).view(x.shape[0], x.shape[1], 3, num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k = attn.norm(q, k, v)
    return q, k, v


def _modulated(norm, x, mod):
    return torch.addcmul(mod.shift, norm(x), 1 + mod.scale)


def double_block(block, img, txt, vec, pe):
    """DoubleStreamBlock.forward (text tokens first in the joint attention), out of place."""
    img_mod1, img_mod2 = block.img_mod(vec)
    txt_mod1, txt_mod2 = block.txt_mod(vec)
    img_q, img_k, img_v = _heads(block.img_attn, _modulated(block.img_norm1, img, img_mod1), block.num_heads)
    txt_q, txt_k, txt_v = _heads(block.txt_attn, _modulated(block.txt_norm1, txt, txt_mod1), block.num_heads)
    q, k, v = (torch.cat(pair, 2) for pair in ((txt_q, img_q), (txt_k, img_k), (txt_v, img_v)))
    attn = _attention(q, k, v, pe)
    txt_attn, img_attn = attn[:, :txt.shape[1]], attn[:, txt.shape[1]:]
    img = img + block.img_attn.proj(img_attn) * img_mod1.gate
    img = img + block.img_mlp(_modulated(block.img_norm2, img, img_mod2)) * img_mod2.gate
    txt = txt + block.txt_attn.proj(txt_attn) * txt_mod1.gate
    txt = txt + block.txt_mlp(_modulated(block.txt_norm2, txt, txt_mod2)) * txt_mod2.gate
    return img, txt


def single_block(block, x, vec, pe):
    """SingleStreamBlock.forward, out of place."""
    mod, _ = block.modulation(vec)
    qkv, mlp = torch.split(block.linear1(_modulated(block.pre_norm, x, mod)),
                           [3 * block.hidden_size, block.mlp_hidden_dim_first], dim=-1)
    q, k, v = qkv.view(qkv.shape[0], qkv.shape[1], 3, block.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k = block.norm(q, k, v)
    output = block.linear2(torch.cat((_attention(q, k, v, pe), block.mlp_act(mlp)), 2))
    return x + output * mod.gate


def out_of_place_options(flux) -> dict:
    """``transformer_options`` for ``flux(x, t, context, y, transformer_options=...)`` that make its
    forward differentiable (see the module docstring). Build it once per call: ComfyUI's forward
    writes bookkeeping entries into it."""
    replace = {}
    for i, block in enumerate(flux.double_blocks):
        def run_double(args, _, block=block):
            img, txt = double_block(block, args["img"], args["txt"], args["vec"], args["pe"])
            return {"img": img, "txt": txt}
        replace[("double_block", i)] = run_double
    for i, block in enumerate(flux.single_blocks):
        def run_single(args, _, block=block):
            return {"img": single_block(block, args["img"], args["vec"], args["pe"])}
        replace[("single_block", i)] = run_single
    return {"patches_replace": {"dit": replace}}


@torch.no_grad()
def check_matches_comfy(flux, x, timestep, context, y, atol: float = 1e-4) -> float:
    """Run both forwards on the same inputs; raise if they differ by more than ``atol``."""
    ours = flux(x, timestep, context, y=y, transformer_options=out_of_place_options(flux))
    theirs = flux(x, timestep, context, y=y, transformer_options={})
    difference = float((ours - theirs).abs().max())
    if difference > atol:
        raise AssertionError(f"out-of-place FLUX forward differs from ComfyUI's by {difference:.2e}")
    return difference
