"""predict()'s fused kernels: torch.compile turns each weighted sum into one pass over the history.

Eager torch has no single kernel for a per-channel weighted sum of m tensors, so it makes one
pass per term (see predict.py); the code inductor generates for these sums reads each term once
and writes the output once, accumulating half precision in fp32 registers, so at FLUX size it costs
less than the eager ops for three or four terms in fp32 and two to four in bf16 (two fp32 terms keep
the eager lerp, which reads both at once).  Compiling takes seconds per history length and dtype on
first use (more for the first kernel with a cold inductor cache, less with its disk cache warm) and
needs a working torch.compile (a C++ compiler on the CPU).  benchmarks/bench_predict.py measures
both; the figures are in the README ("The algorithm's own costs").  Where compiling fails,
`weighted_sum` logs why once per device type and returns None, and the caller takes the eager ops.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence

import torch


# One function per history length: torch.compile keeps its cache and recompile budget per code
# object, so dtypes and devices vary within a function's budget, not with m.
def _sum2(out, w, h0, h1):
    return out.copy_(h0 * w[0] + h1 * w[1])


def _sum3(out, w, h0, h1, h2):
    return out.copy_(h0 * w[0] + h1 * w[1] + h2 * w[2])


def _sum4(out, w, h0, h1, h2, h3):
    return out.copy_(h0 * w[0] + h1 * w[1] + h2 * w[2] + h3 * w[3])


def _sum5(out, w, h0, h1, h2, h3, h4):
    return out.copy_(h0 * w[0] + h1 * w[1] + h2 * w[2] + h3 * w[3] + h4 * w[4])


# Below about this many elements per residual the eager ops win on the dev CPU: a compiled call
# carries a fixed cost of guards and Python wrappers, which smaller residuals do not earn back
# (benchmarks/bench_predict.py --crossover; the crossover figures are in the README).
MIN_ELEMENTS = 1 << 20
# one term needs no fusing (a single mul is one pass); five are a base and four history terms
_SUMS = {2: _sum2, 3: _sum3, 4: _sum4, 5: _sum5}
_compiled: dict[int, object] = {}
_failed: set[str] = set()  # device types where compiling failed


def supports(m: int) -> bool:
    """Whether a sum of m terms has a fused kernel."""
    return m in _SUMS


def weighted_sum(history: Sequence[torch.Tensor], weights: torch.Tensor, out: torch.Tensor,
                 base: torch.Tensor | None = None) -> torch.Tensor | None:
    """out = base + sum_j weights[j] * history[j] (base optional) in one pass, or None where
    torch.compile cannot build it.

    weights: (m, D), in fp32 at least: the sum is formed in fp32 at least and rounded once, into out.
    base: a tensor of history's shape, of any float dtype.
    """
    device = out.device.type
    if device in _failed:
        return None
    if base is not None:  # one more term, of weight 1 (exact), keeps one kernel per number of terms
        history, weights = [base, *history], torch.cat([torch.ones_like(weights[:1]), weights])
    m = len(history)
    kernel = _compiled.get(m)
    if kernel is None:
        kernel = _compiled[m] = torch.compile(_SUMS[m], dynamic=True, fullgraph=True)
    try:
        return kernel(out, weights, *history)
    except Exception as error:  # noqa: BLE001 - any failure to build the kernel leaves the eager path
        _failed.add(device)
        logging.warning("HyCa: torch.compile could not build the fused predict kernel on %s (%s: %s); "
                        "predicting with eager torch ops instead.", device, type(error).__name__,
                        (str(error).strip().splitlines() or [""])[0])
        return None
