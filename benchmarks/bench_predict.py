"""Cost of hyca_core.predict.predict relative to a plain torch.add, FLUX-size residual.

Usage: python benchmarks/bench_predict.py [--reps N] [--crossover] [--grouped]

Both are timed interleaved in one run (warmup first, then the median of N alternating
repetitions), so a noisy machine slows both alike.  The baseline adds two tensors of the
history's dtype into a preallocated output; predict also writes into a preallocated output.
Coefficients are what a solver map produces: channels spread over the pool members that fit
in m history slots (zero-padded), two steps ahead of a history spaced three steps apart.
Each row times predict() as HyCa Apply runs it with fused on (the kernels torch.compile
builds, compiled before timing; two fp32 terms of pool solvers keep the single lerp, which reads
both at once) and without it ("eager": torch ops, one pass per term, whose floor for m=4 is 2.5x,
see hyca_core/predict.py).  Target: ratio <= 2.5 with fused.  The "arbitrary" rows
(random, non-affine coefficients, which take the general addcmul chain) are for information.
--crossover also times the fused kernel against the eager ops on smaller residuals (the kernel
runs regardless of hyca_core.fused.MIN_ELEMENTS here): where its per-call cost stops paying.
--grouped times what a dense (m, D) table costs the channels that need fewer terms: 3 of 8 k-means
clusters (channels scattered at random) weighing 4 terms, the rest 2, predicted densely (every
channel pays 4 terms) against the 2 shared terms densely plus the other 2 gathered for the channels
that use them and scattered back (index_select, index_add_).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hyca_core import fused  # noqa: E402
from hyca_core.predict import predict, prepare  # noqa: E402
from hyca_core.solvers import POOL  # noqa: E402
from harness.wall_clock import median_times  # noqa: E402

SHAPE = (1, 4096, 3072)
LIMIT = 2.5


def map_coefficients(m: int, channels: int) -> torch.Tensor:
    """(m, channels) weights of the pool members with history <= m, assigned round-robin."""
    times = [3.0 * i for i in range(m)]
    rows = []
    for s in (s for s in POOL if s.history <= m):
        w = torch.zeros(m, dtype=torch.float64)
        w[m - s.history:] = torch.tensor(s.weights(times[m - s.history:], times[-1] + 2))
        rows.append(w)
    table = torch.stack(rows, 1)  # (m, members)
    return table[:, torch.arange(channels) % table.shape[1]].float()


def crossover(reps: int) -> None:
    """Eager ops against the fused kernel, called directly, on residuals of 32 to 2048 tokens (and 4 x 8:
    nothing but the compiled call's own cost)."""
    print(f"crossover (us, median of {reps}; "
          f"the hot path takes the kernel from {fused.MIN_ELEMENTS} elements)")
    for dtype, m in ((torch.float32, 3), (torch.float32, 4), (torch.bfloat16, 2), (torch.bfloat16, 4)):
        for shape in [(1, 4, 8)] + [(1, tokens, SHAPE[-1]) for tokens in (32, 128, 256, 512, 2048)]:
            history = list(torch.randn(m, *shape).to(dtype))
            coeffs = map_coefficients(m, shape[-1])
            eager, weights = (prepare(coeffs, dtype, "cpu", fused=f) for f in (False, True))
            out = torch.empty(shape, dtype=dtype)
            t_eager, t_fused = median_times([lambda: predict(history, eager, out),
                                              lambda: fused.weighted_sum(history, weights.fused, out)], reps)
            print(f"{str(dtype):15s} m={m} {history[0].numel() / 2**20:6.3f} M elements"
                  f"  eager {t_eager * 1e6:8.0f}  fused {t_fused * 1e6:8.0f}")


def grouped(reps: int) -> None:
    """Dense prediction against gathering the extra terms of the channels that need them."""
    generator = torch.Generator().manual_seed(0)
    many = torch.randint(0, 8, (SHAPE[-1],), generator=generator) < 3  # cluster labels scatter channels
    channels = many.nonzero().flatten()
    coeffs = map_coefficients(4, SHAPE[-1])
    coeffs[:2, ~many] = 0  # the values do not matter to the time, only which terms a channel weighs
    extra = coeffs[:2, channels]
    print(f"dense against gathered per-term groups ({len(channels)} of {SHAPE[-1]} channels need 4 terms)")
    for dtype in (torch.float32, torch.bfloat16):
        history = list(torch.randn(4, *SHAPE).to(dtype))
        weights = prepare(coeffs, dtype, "cpu")
        shared = prepare(coeffs[2:], dtype, "cpu")
        out = torch.empty(SHAPE, dtype=dtype)

        def gathered():
            predict(history[2:], shared, out)
            picked = [h.index_select(-1, channels) for h in history[:2]]
            out.index_add_(-1, channels, (picked[0] * extra[0] + picked[1] * extra[1]).to(dtype))

        t_dense, t_grouped = median_times([lambda: predict(history, weights, out), gathered], reps)
        print(f"{str(dtype):15s} dense {t_dense * 1e3:7.2f} ms  grouped {t_grouped * 1e3:7.2f} ms "
              f"({t_grouped / t_dense:.2f}x)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--crossover", action="store_true", help="also time smaller residuals")
    parser.add_argument("--grouped", action="store_true", help="also time per-term channel groups")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, shape {SHAPE}")
    failed = False
    for dtype in (torch.float32, torch.bfloat16):
        a, b = (torch.randn(SHAPE).to(dtype) for _ in range(2))
        add_out = torch.empty(SHAPE, dtype=dtype)
        for m, kind in ((1, "map"), (2, "map"), (3, "map"), (4, "map"), (4, "arbitrary")):
            history = torch.randn(m, *SHAPE).to(dtype)
            coeffs = map_coefficients(m, SHAPE[-1]) if kind == "map" else torch.randn(m, SHAPE[-1])
            # as the node does, once per weight table
            eager, compiled = (prepare(coeffs, dtype, "cpu", fused=f) for f in (False, True))
            out = torch.empty(SHAPE, dtype=dtype)
            if compiled.fuses(base=False) and kind == "map":
                compiling = time.perf_counter()
                predict(history, compiled, out)
                print(f"  (fused kernel for m={m} {dtype} ready in {time.perf_counter() - compiling:.1f} s)")
            # history bound now: the loop deletes it below to free the residuals before the next row
            t_add, t_eager, t_compiled = median_times(
                [lambda: torch.add(a, b, out=add_out), lambda h=history: predict(h, eager, out),
                 lambda h=history: predict(h, compiled, out)], args.reps)
            ratio = t_compiled / t_add
            if kind == "map":
                verdict = "PASS" if ratio <= LIMIT else "FAIL"
                failed |= ratio > LIMIT
            else:
                verdict = "(info)"
            path = "fused" if compiled.fuses(base=False) else "eager ops"
            print(f"{str(dtype):15s} m={m} {kind:9s}  add {t_add * 1e3:6.2f} ms  "
                  f"eager {t_eager / t_add:4.2f}x  fused ({path:9s}) {t_compiled * 1e3:6.2f} ms  "
                  f"ratio {ratio:4.2f}  {verdict}")
            del history
    if args.crossover:
        crossover(max(args.reps, 100))
    if args.grouped:
        grouped(args.reps)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
