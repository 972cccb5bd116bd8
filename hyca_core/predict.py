"""The hot path: predicted residual = per-channel weighted sum of cached residuals.

Prediction is memory-bound, and torch offers no single kernel for a per-channel weighted sum
of m tensors, so the cost is the number of full passes.  Counting the write-allocate read of a
fresh output, torch.add costs 4 units; a mul + addcmul_ chain costs 3m; a chain of lerps (for
the affine weights every pool solver produces) costs 4 + 3(m-2), because its first op reads two
history terms at once; 10 units (2.5x) is thus the floor for m=4 with unchunked eager ops.  Measured on
the 2-core dev CPU, FLUX size 4096 x 3072, ratio to torch.add of the same dtype (medians; the
machine is shared, contended runs read ~0.2 higher):
    fp32 m=2: lerp 1.05, addcmul chain 1.49      m=3: lerp 1.83, chain 2.21
    fp32 m=4: lerp 2.67, chain 3.05, chunked variants keeping the accumulator in L2 2.9-4.7
      (per-op overhead and the in-cache speed of eager ops eat the saved traffic), depthwise
      conv2d over a channels_last view 3.7-6, einsum 135 (bmm with permuted copies); nor do
      forms reading each term once: linalg.vecdot over a (T, C, m)-interleaved history 19,
      numpy.einsum (one thread) 3.0 (two threads 2.9-3.3), numexpr 5.7-9, a torch.compile'd sum
      returning a new tensor 3.4-4.3 (allocating 48 MB faults its pages in on every call), or a
      compiled sum over dim 0 of the stacked history 4-8 (inductor's reduction loop)
    bf16: chain in bf16 1.7-1.9 / 2.75 / 4.0-4.3 for m=2/3/4; fp32 accumulation through
      mixed-dtype kernels 7-29; lerp would need bf16 weights (inaccurate).
Hence: lerp chain on CPU for fp32/fp64 when exact and well conditioned, addcmul chain otherwise;
or, on request, the single-pass kernels torch.compile builds, unrolled over the terms and writing
into the output (fused.py: 1.1-1.8x for m=2-4, fp32 and bf16, on the CPU).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from . import fused as fused_kernels

_HALF = (torch.float16, torch.bfloat16)
_LERP_MAX_WEIGHT = 8.0


def _lerp_weights(coeffs: torch.Tensor) -> torch.Tensor | None:
    """w (m-1, D) with sum_j c_j h_j = lerp(..lerp(lerp(h_0, h_1, w_0), h_2, w_1).., h_m-1, w_m-2),
    or None where that chain would be inexact or lose accuracy.

    The chain carries prefix-normalised partial sums (sum_{i<=j} c_i h_i) / P_j, P_j = sum_{i<=j}
    c_i, so w_{j-1} = c_j / P_j and it needs sum_j c_j = 1 (every pool solver is consistent).
    A prefix that nearly cancels or a large |w| amplifies rounding: with the limits below the
    error stays within ~2e-6 of sum_j |c_j h_j| in fp32 (10x the addcmul chain's) over the pool
    on random grids up to 5 steps ahead, and 88% of those cases qualify.
    """
    c = coeffs.double()
    prefix = c.cumsum(0)
    mass = c.abs().cumsum(0)
    if ((prefix[-1] - 1).abs() > 1e-6 * mass[-1]).any():
        return None
    if ((prefix[1:-1].abs() < mass[1:-1] / 8) & (mass[1:-1] > 0)).any():
        return None
    # P_j == 0 is left only for an all-zero prefix, whose partial sum the next step discards
    w = torch.where(prefix[1:] == 0, 0.0, c[1:] / prefix[1:])
    return w if w.abs().max() <= _LERP_MAX_WEIGHT else None


class Weights(NamedTuple):
    """Per-channel weights made ready once for histories of one dtype and device (`prepare`)."""

    dtype: torch.dtype  # the histories'
    coeffs: torch.Tensor  # (m, D): in the dtype the terms are combined in
    lerp: torch.Tensor | None  # (m-1, D) lerp-chain weights, where that chain is exact and well conditioned
    fp32_accumulate: bool  # half precision off the CPU: combined in fp32, rounded once
    fused: torch.Tensor | None = None  # (m, D) for the fused kernel, fp32 at least; None: eager ops only


def prepare(coeffs: torch.Tensor, dtype: torch.dtype, device: torch.device | str,
            fused: bool = False) -> Weights:
    """(m, D) per-channel weights ready for `predict` on histories of `dtype` on `device`.

    Off-CPU, half-precision histories are accumulated in fp32 and rounded once; on CPU they are
    combined in their own dtype, because mixed-dtype kernels there cost 5-10x a plain add.
    Deriving the lerp form costs about as much as predicting a small model's residual, so a hot
    loop prepares each set of weights once.  ``fused``: on the CPU, predict residuals of
    `fused.MIN_ELEMENTS` or more with torch.compile's single-pass kernel where it beats the eager
    ops (not for two terms that one lerp reads at once), accumulating in fp32 at least.
    Elsewhere the eager ops stay: a compiled call costs 0.1-0.2 ms of guards and Python
    wrappers (dev CPU), several times what a GPU takes for a pass over a FLUX-size residual.
    """
    device = torch.device(device)
    coeffs = coeffs.to(device)
    on_cpu = device.type == "cpu"
    if dtype in _HALF and not on_cpu:
        return Weights(dtype, coeffs.float(), None, True)
    # lerp weights rounded to half precision would cost accuracy; off-CPU the chain is cheap
    lerp = _lerp_weights(coeffs) if on_cpu and len(coeffs) > 1 and dtype not in _HALF else None
    single = None
    if fused and on_cpu and fused_kernels.supports(len(coeffs)) and not (lerp is not None and len(coeffs) == 2):
        single = coeffs.to(torch.promote_types(dtype, torch.float32))
    return Weights(dtype, coeffs.to(dtype), None if lerp is None else lerp.to(dtype), False, single)


def predict(history: torch.Tensor | Sequence[torch.Tensor], weights: torch.Tensor | Weights,
            out: torch.Tensor | None = None) -> torch.Tensor:
    """sum_j weights[j] * history[j], weights broadcast over all but the last dimension.

    history: (m, *shape, D) cached residuals oldest first, or a sequence of m (*shape, D)
    tensors (e.g. views into a ring buffer); any float dtype.  weights: (m, D) per-channel
    weights, or the same `prepare`d for history's dtype and device.  out: optional (*shape, D)
    tensor of history's dtype.
    """
    first = history[0]
    if not isinstance(weights, Weights):
        weights = prepare(weights, first.dtype, first.device)
    m, channels = weights.coeffs.shape
    if len(history) != m or first.shape[-1] != channels or weights.dtype != first.dtype:
        raise ValueError(f"{len(history)} history terms of shape {tuple(first.shape)} {first.dtype} do not "
                         f"match weights {tuple(weights.coeffs.shape)} prepared for {weights.dtype}")
    if out is None:
        out = torch.empty_like(first, memory_format=torch.contiguous_format)
    elif out.shape != first.shape or out.dtype != first.dtype:
        raise ValueError(f"out must be {tuple(first.shape)} {first.dtype}, "
                         f"got {tuple(out.shape)} {out.dtype}")
    if (weights.fused is not None and out.numel() >= fused_kernels.MIN_ELEMENTS
            and fused_kernels.weighted_sum(history, weights.fused, out) is not None):
        return out
    if weights.fp32_accumulate:
        return _fp32_accumulate(history, weights.coeffs, out)
    if weights.lerp is not None:
        return _lerp_chain(history, weights.lerp, out)
    return _addcmul_chain(history, weights.coeffs, out)


def _fp32_accumulate(history, coeffs, out):
    acc = torch.mul(history[0], coeffs[0])  # fp32 weights promote to an fp32 accumulator
    for j in range(1, len(history)):
        acc.addcmul_(history[j], coeffs[j])
    return out.copy_(acc)


def _lerp_chain(history, lerp, out):
    torch.lerp(history[0], history[1], lerp[0], out=out)
    for j in range(2, len(history)):
        out.lerp_(history[j], lerp[j - 1])
    return out


def _addcmul_chain(history, coeffs, out):
    torch.mul(history[0], coeffs[0], out=out)
    for j in range(1, len(history)):
        out.addcmul_(history[j], coeffs[j])
    return out


class ResidualHistory:
    """Ring buffer of the last `capacity` residuals of one block for one sampling state.

    push() copies into preallocated storage (optionally another dtype/device, e.g. bf16 on
    CPU), so callers may modify their tensor in place afterwards.  Slots are never rotated: a
    write index tracks the newest, and predict() receives the slots as views in time order.
    """

    def __init__(self, capacity: int, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._dtype = dtype
        self._device = None if device is None else torch.device(device)
        self._buffer: torch.Tensor | None = None
        self._next = 0  # slot the next push writes
        self._len = 0

    @property
    def dtype(self) -> torch.dtype | None:
        return self._buffer.dtype if self._buffer is not None else self._dtype

    @property
    def device(self) -> torch.device | None:
        return self._buffer.device if self._buffer is not None else self._device

    @property
    def nbytes(self) -> int:
        """Bytes held by the storage (all slots are allocated at the first push)."""
        return 0 if self._buffer is None else self._buffer.numel() * self._buffer.element_size()

    def __len__(self) -> int:
        return self._len

    def push(self, residual: torch.Tensor) -> None:
        if self._buffer is None:
            self._buffer = torch.empty((self.capacity, *residual.shape),
                                       dtype=self._dtype or residual.dtype,
                                       device=self._device or residual.device)
        elif residual.shape != self._buffer.shape[1:]:
            raise ValueError(f"residual shape {tuple(residual.shape)} differs from the history's "
                             f"{tuple(self._buffer.shape[1:])}; clear() first")
        self._buffer[self._next].copy_(residual)
        self._next = (self._next + 1) % self.capacity
        self._len = min(self._len + 1, self.capacity)

    def drop_newest(self) -> None:
        """Forget the newest residual (its slot is reused by the next push)."""
        if not self._len:
            raise IndexError("drop_newest() on an empty history")
        self._next = (self._next - 1) % self.capacity
        self._len -= 1

    def slots(self) -> list[int]:
        """Storage slot of each stored residual, oldest first."""
        return [(self._next - self._len + i) % self.capacity for i in range(self._len)]

    def views(self) -> list[torch.Tensor]:
        """The stored residuals oldest first, as views of the storage (no copies)."""
        return [self._buffer[s] for s in self.slots()]

    def prepare(self, coeffs: torch.Tensor, fused: bool = False) -> Weights:
        """`prepare` for this history's storage (after the first push)."""
        return prepare(coeffs, self._buffer.dtype, self._buffer.device, fused)

    def predict(self, weights: torch.Tensor | Weights, out: torch.Tensor | None = None) -> torch.Tensor:
        """predict() over the newest m residuals, m the weights' rows (oldest first)."""
        if not isinstance(weights, Weights):
            weights = self.prepare(weights)
        k = weights.coeffs.shape[0]
        if not 1 <= k <= self._len:
            raise ValueError(f"{k} coefficient rows but {self._len} residuals stored")
        return predict(self.views()[-k:], weights, out)

    def clear(self) -> None:
        """Forget all residuals and release the storage."""
        self._buffer = None
        self._next = 0
        self._len = 0
