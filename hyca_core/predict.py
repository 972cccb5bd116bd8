"""The hot path: predicted residual = per-channel weighted sum of cached residuals.

Prediction is memory-bound, and torch offers no single kernel for a per-channel weighted sum
of m tensors, so the cost is the number of full passes.  Counting the write-allocate read of a
fresh output, torch.add costs 4 units; a mul + addcmul_ chain costs 3m; a chain of lerps (for
the affine weights every pool solver produces) costs 4 + 3(m-2), because its first op reads two
history terms at once; 10 units against torch.add's 4 is thus the floor for m=4 with unchunked
eager ops.  Measured at FLUX size, no other form beat the lerp chain for m=4 in fp32: not chunked
variants keeping the accumulator in L2 (per-op overhead and the in-cache speed of eager ops eat the saved
traffic), a depthwise conv2d over a channels_last view, or einsum (bmm with permuted copies); nor
forms reading each term once: linalg.vecdot over a (T, C, m)-interleaved history, numpy.einsum,
numexpr, a torch.compile'd sum returning a new tensor (allocating 48 MB faults its pages in on
every call), or a compiled sum over dim 0 of the stacked history (inductor's reduction loop).  In
bf16 a chain in bf16 rounds the weights, which then no longer sum to 1 and bias every channel, and
fp32 accumulation through full-size mixed-dtype ops costs far more (the CPU casts each operand
into a temporary first; over cached row chunks far less).  Each form's cost relative to torch.add
is in the README ("The algorithm's own costs"); benchmarks/bench_predict.py times the chains the
hot path takes.
Hence: weights and sums in fp32 at least whatever the history's dtype, rounded once into the
result; lerp chain on CPU for fp32/fp64 when exact and well conditioned, addcmul chain otherwise,
over row chunks where dtypes mix on the CPU; or, on request, the single-pass kernels
torch.compile builds, unrolled over the terms and writing into the output (fused.py).  A block's
input (`base`) starts the chain (a term of weight 1 in the fused kernel), so adding it costs no
pass of its own, and terms no channel weighs are never read.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch

from . import fused as fused_kernels

_HALF = (torch.float16, torch.bfloat16)
_LERP_MAX_WEIGHT = 8.0


def lerp_weights(coeffs: torch.Tensor) -> torch.Tensor | None:
    """w (m-1, D) with sum_j c_j h_j = lerp(..lerp(lerp(h_0, h_1, w_0), h_2, w_1).., h_m-1, w_m-2),
    or None where that chain would be inexact or lose accuracy.

    The chain carries prefix-normalised partial sums (sum_{i<=j} c_i h_i) / P_j, P_j = sum_{i<=j}
    c_i, so w_{j-1} = c_j / P_j and it needs sum_j c_j = 1 (every pool solver is consistent).
    A prefix that nearly cancels or a large |w| amplifies rounding, so the limits below refuse
    both: what passes errs more than the addcmul chain but stays small in fp32 over the pool on
    random grids up to 5 steps ahead, where most cases qualify (the measured error and share are
    in the README, "The algorithm's own costs").
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
    terms: int  # history terms (m) the weights were made for
    rows: tuple[int, ...]  # those terms some channel weighs, oldest first: the others are never read
    coeffs: torch.Tensor  # (len(rows), D) in the accumulation dtype: fp32 for half-precision histories
    lerp: torch.Tensor | None  # (len(rows)-1, D) lerp-chain weights, where exact and well conditioned
    fused: torch.Tensor | None = None  # coeffs, for the fused kernel; None: eager ops only

    def fuses(self, base: bool) -> bool:
        """Whether predict() sums (onto a base, if `base`) with the fused kernel, for residuals of
        `fused.MIN_ELEMENTS` or more: not one term alone, nor two fp32 terms that one lerp reads at once."""
        terms = len(self.rows) + base
        one_lerp = not base and self.lerp is not None and terms == 2
        return self.fused is not None and fused_kernels.supports(terms) and not one_lerp


def prepare(coeffs: torch.Tensor | np.ndarray, dtype: torch.dtype, device: torch.device | str,
            fused: bool = False, with_base: bool = False) -> Weights:
    """(m, D) per-channel weights ready for `predict` on histories of `dtype` on `device`.

    Weights and sums are in fp32 at least, whatever the history's dtype: half-precision weights
    no longer sum to 1 and would bias every channel.  Terms no channel weighs are dropped.
    Deriving the lerp form costs about as much as predicting a small model's residual, so a hot
    loop prepares each set of weights once.  ``fused``: on the CPU, predict residuals of
    `fused.MIN_ELEMENTS` or more with torch.compile's single-pass kernel where it beats the eager
    ops (not for two terms that one lerp reads at once).  Elsewhere the eager ops stay: a compiled
    call's guards and Python wrappers cost several times what a GPU takes for a pass over a
    FLUX-size residual (benchmarks/bench_predict.py --crossover; the figure is in the README).
    ``with_base``: the weights will sum onto a base (`predict(base=)`), which the lerp chain does
    not serve: its weights are not derived.
    """
    device = torch.device(device)
    # the rows are picked in numpy: a predicting run prepares weights for every block at every step, and
    # torch's per-op cost would make this several times slower on a small model
    table = coeffs.detach().cpu().numpy() if isinstance(coeffs, torch.Tensor) else np.asarray(coeffs)
    used = np.flatnonzero(table.any(axis=1)).tolist() or [len(table) - 1]
    kept = torch.from_numpy(table[used])
    accumulate = torch.promote_types(dtype, torch.float32)
    on_cpu = device.type == "cpu"
    # a lerp chain can only be as precise as its weights, held in the history's dtype
    lerp = lerp_weights(kept) if on_cpu and not with_base and len(kept) > 1 and dtype == accumulate else None
    kept = kept.to(device=device, dtype=accumulate)
    single = kept if fused and on_cpu and fused_kernels.supports(len(kept) + 1) else None
    return Weights(dtype, len(table), tuple(used), kept, None if lerp is None else lerp.to(dtype), single)


def predict(history: torch.Tensor | Sequence[torch.Tensor], weights: torch.Tensor | Weights,
            out: torch.Tensor | None = None, base: torch.Tensor | None = None) -> torch.Tensor:
    """base + sum_j weights[j] * history[j] (no base: the sum alone), weights broadcast over all but
    the last dimension, summed in fp32 at least and rounded once into the result.

    history: (m, *shape, D) cached residuals oldest first, or a sequence of m (*shape, D) tensors
    (e.g. views into a ring buffer); any float dtype.  weights: (m, D) per-channel weights, or the
    same `prepare`d for history's dtype and device.  base: optional (*shape, D) tensor of any float
    dtype and device (a block's input): the result takes its dtype and device.  Without base the
    result has history's dtype and device.  out: optional tensor of the result's shape, dtype and
    device to write into; it may be base itself.  Each history term weighed is read once, in one
    pass over the result; a base on another device than the history costs one more pass (the sum
    is formed where the history is, moved, then added).
    """
    first = history[0]
    if not isinstance(weights, Weights):
        weights = prepare(weights, first.dtype, first.device)
    channels = weights.coeffs.shape[1]
    if len(history) != weights.terms or first.shape[-1] != channels or weights.dtype != first.dtype:
        raise ValueError(f"{len(history)} history terms of shape {tuple(first.shape)} {first.dtype} do not "
                         f"match weights for {weights.terms} x {channels} prepared for {weights.dtype}")
    if base is not None and base.shape != first.shape:
        raise ValueError(f"base must be {tuple(first.shape)}, got {tuple(base.shape)}")
    like = first if base is None else base
    if out is None:
        out = torch.empty(like.shape, dtype=like.dtype, device=like.device)
    elif out.shape != like.shape or out.dtype != like.dtype or out.device != like.device:
        raise ValueError(f"out must be {tuple(like.shape)} {like.dtype} on {like.device}, "
                         f"got {tuple(out.shape)} {out.dtype} on {out.device}")
    if base is not None and base.device != first.device:
        return torch.add(base, predict(history, weights).to(base.device), out=out)
    terms = [history[i] for i in weights.rows]
    if base is not None:
        base = base.detach()  # the history is: nothing here is differentiated, and out= refuses autograd
    if (out.numel() >= fused_kernels.MIN_ELEMENTS and weights.fuses(base is not None)
            and fused_kernels.weighted_sum(terms, weights.fused, out, base) is not None):
        return out
    if base is None and weights.lerp is not None:
        return _lerp_chain(terms, weights.lerp, out)
    return _accumulate(terms, weights.coeffs, out, base)


# On the CPU an eager op whose operands differ in dtype first casts each into a full-size temporary of
# the computing dtype (accelerators cast inside their kernels), which costs many plain adds at FLUX
# size (the README's "The algorithm's own costs" keeps the figure).  Over row chunks of this many
# elements per thread the temporaries stay in each core's L2 (one thread: faster than the bf16 chain
# was).  The price is more ops: on a machine whose cores are oversubscribed their thread barriers
# stall (bench_block_overhead.py --passes); the fused kernels sum in one kernel there.
_CHUNK_ELEMENTS = 1 << 16


def _accumulate(terms, coeffs, out, base):
    """out = base + sum_j coeffs[j] * terms[j] (base optional), in coeffs' dtype, rounded once into out."""
    operands = [out, *terms] if base is None else [out, base, *terms]
    if not _chunked(operands, coeffs.dtype):
        return _chain(terms, coeffs, out, base)
    scratch = None
    for out_rows, *rest in _rows(operands):
        if scratch is None:  # the first chunk is the longest
            scratch = torch.empty(out_rows.shape, dtype=coeffs.dtype)
        base_rows, terms_rows = (None, rest) if base is None else (rest[0], rest[1:])
        _chain(terms_rows, coeffs, out_rows, base_rows, scratch[:len(out_rows)])
    return out


def _difference(after, before, out):
    """out = after - before, rounded once into out."""
    operands = [out, after, before]
    if not _chunked(operands, torch.promote_types(after.dtype, before.dtype)):
        return torch.sub(after, before, out=out)
    for out_rows, after_rows, before_rows in _rows(operands):
        torch.sub(after_rows, before_rows, out=out_rows)
    return out


def _chunked(operands, dtype) -> bool:
    """Whether an op computing in `dtype` over these same-device tensors should go over row chunks."""
    return (operands[0].device.type == "cpu" and any(t.dtype != dtype for t in operands)
            and all(t.is_contiguous() for t in operands))


def _rows(operands):
    """Row chunks (_CHUNK_ELEMENTS a thread) of contiguous (*shape, D) tensors of one shape, zipped."""
    width = operands[0].shape[-1]
    rows = max(1, _CHUNK_ELEMENTS * torch.get_num_threads() // width)
    return zip(*(t.view(-1, width).split(rows) for t in operands))


def _chain(terms, coeffs, out, base, scratch=None):
    """out = base + sum_j coeffs[j] * terms[j] (base optional), one op per term; the partial sums stay in
    coeffs' dtype: in out itself where it has that dtype, else in scratch (allocated if None)."""
    acc = out
    if out.dtype != coeffs.dtype and len(terms) > 1:
        acc = torch.empty(out.shape, dtype=coeffs.dtype, device=out.device) if scratch is None else scratch
    last = len(terms) - 1
    for j, (term, c) in enumerate(zip(terms, coeffs)):
        into = out if j == last else acc
        if j:
            torch.addcmul(acc, term, c, out=into)
        elif base is None:
            torch.mul(term, c, out=into)
        else:
            torch.addcmul(base, term, c, out=into)
    return out


def _lerp_chain(history, lerp, out):
    torch.lerp(history[0], history[1], lerp[0], out=out)
    for j in range(2, len(history)):
        out.lerp_(history[j], lerp[j - 1])
    return out


class ResidualHistory:
    """Ring buffer of the last `capacity` residuals of one block for one sampling state.

    push() copies into preallocated storage (optionally another dtype/device, e.g. bf16 on
    CPU), so callers may modify their tensor in place afterwards; push_difference() writes a
    block's output minus its input there directly.  Slots are never rotated: a
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
        self._slot(residual).copy_(residual)
        self._advance()

    def push_difference(self, after: torch.Tensor, before: torch.Tensor) -> None:
        """Store ``after - before`` (a block's output minus its input) as the newest residual, written
        straight into its slot: one pass over both, no temporary where the storage shares their device."""
        if after.shape != before.shape:
            raise ValueError(f"after {tuple(after.shape)} and before {tuple(before.shape)} differ in shape")
        slot = self._slot(after)
        after, before = after.detach(), before.detach()
        if slot.device != after.device:  # offloaded: subtract where the activations are, move once
            slot.copy_(after - before)
        else:
            _difference(after, before, slot)
        self._advance()

    def _slot(self, like: torch.Tensor) -> torch.Tensor:
        """The slot the next residual of `like`'s shape goes into (the storage is made at the first push)."""
        if self._buffer is None:
            self._buffer = torch.empty((self.capacity, *like.shape), dtype=self._dtype or like.dtype,
                                       device=self._device or like.device)
        elif like.shape != self._buffer.shape[1:]:
            raise ValueError(f"residual shape {tuple(like.shape)} differs from the history's "
                             f"{tuple(self._buffer.shape[1:])}; clear() first")
        return self._buffer[self._next]

    def _advance(self) -> None:
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

    def prepare(self, coeffs: torch.Tensor | np.ndarray, fused: bool = False,
                with_base: bool = False) -> Weights:
        """`prepare` for this history's storage (after the first push)."""
        return prepare(coeffs, self._buffer.dtype, self._buffer.device, fused, with_base)

    def predict(self, weights: torch.Tensor | Weights, out: torch.Tensor | None = None,
                base: torch.Tensor | None = None) -> torch.Tensor:
        """predict() over the newest m residuals, m the terms the weights were made for (oldest first)."""
        if not isinstance(weights, Weights):
            weights = self.prepare(weights)
        if not 1 <= weights.terms <= self._len:
            raise ValueError(f"{weights.terms} coefficient rows but {self._len} residuals stored")
        return predict(self.views()[-weights.terms:], weights, out, base)

    def clear(self) -> None:
        """Forget all residuals and release the storage."""
        self._buffer = None
        self._next = 0
        self._len = 0
