import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hyca_core import fused
from hyca_core import predict as predict_module
from hyca_core.predict import ResidualHistory, predict, prepare
from hyca_core.solvers import POOL


def naive(history, coeffs):
    return sum(c.double() * h.double() for c, h in zip(coeffs, history))


def scale(history, coeffs):
    """sum_j |c_j h_j|: the size rounding errors are measured against."""
    return sum((c.double() * h.double()).abs() for c, h in zip(coeffs, history))


def pool_coefficients(m, channels, seed=None):
    """Per-channel weights as a solver map makes them: pool members spread over the channels,
    zero-padded to m rows, on a random non-uniform grid (uniform without a seed) one step ahead."""
    gaps = np.ones(m + 1) if seed is None else np.random.default_rng(seed).uniform(0.5, 1.5, m + 1)
    times = np.cumsum(gaps)
    table = []
    for s in (s for s in POOL if s.history <= m):
        w = np.zeros(m)
        w[m - s.history:] = s.weights(times[m - s.history:m], times[m])
        table.append(w)
    table = torch.tensor(np.array(table).T)
    return table[:, torch.arange(channels) % table.shape[1]].float()


@pytest.mark.parametrize("m", [1, 2, 3, 4])
@pytest.mark.parametrize("shape", [(8,), (10, 8), (2, 5, 8)])
@pytest.mark.parametrize("kind", ["arbitrary", "pool-uniform", "pool-random"])
def test_predict_equals_naive_sum_fp32(m, shape, kind):
    g = torch.Generator().manual_seed(m)
    history = torch.randn(m, *shape, generator=g)
    coeffs = {"arbitrary": lambda: torch.randn(m, shape[-1], generator=g),
              "pool-uniform": lambda: pool_coefficients(m, shape[-1]),
              "pool-random": lambda: pool_coefficients(m, shape[-1], seed=m)}[kind]()
    result = predict(history, coeffs)
    assert result.shape == shape and result.dtype == torch.float32
    error = (result.double() - naive(history, coeffs)).abs()
    assert (error <= 1e-5 * scale(history, coeffs) + 1e-30).all()


def test_lerp_chain_is_used_only_where_accurate():
    for m in (2, 3, 4):
        assert predict_module._lerp_weights(pool_coefficients(m, 16)) is not None
    assert predict_module._lerp_weights(torch.randn(3, 4)) is None  # not affine
    assert predict_module._lerp_weights(torch.tensor([[1.0], [-1.0], [1.0]])) is None  # P_1 = 0
    assert predict_module._lerp_weights(torch.tensor([[-20.0], [21.0]])) is None  # |w| = 21
    zero_padded = torch.tensor([[0.0], [0.0], [-1.0], [2.0]])  # taylor1 in a 4-slot history
    torch.testing.assert_close(predict_module._lerp_weights(zero_padded),
                               torch.tensor([[0.0], [1.0], [2.0]], dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_predict_low_precision_on_cpu(dtype):
    g = torch.Generator().manual_seed(0)
    history = torch.randn(4, 10, 8, generator=g).to(dtype)
    coeffs = pool_coefficients(4, 8, seed=1)
    result = predict(history, coeffs)
    assert result.dtype == dtype
    # one rounding per term and of each coefficient
    bound = 3 * 4 * torch.finfo(dtype).eps * scale(history, coeffs)
    assert ((result.double() - naive(history, coeffs)).abs() <= bound).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fp32_accumulation_rounds_once(dtype):
    """The path accelerators take for half-precision histories, exercised on CPU."""
    g = torch.Generator().manual_seed(0)
    history = torch.randn(4, 10, 8, generator=g).to(dtype)
    coeffs = pool_coefficients(4, 8, seed=2)
    result = predict_module._fp32_accumulate(history, coeffs, torch.empty(10, 8, dtype=dtype))
    expected = naive(history, coeffs)
    ulp = torch.finfo(dtype).eps * expected.abs() + 1e-3 * torch.finfo(dtype).eps * scale(history, coeffs)
    assert ((result.double() - expected).abs() <= ulp).all()


def test_predict_accepts_a_sequence_of_views():
    history, coeffs = torch.randn(3, 4, 6), pool_coefficients(3, 6, seed=3)
    torch.testing.assert_close(predict(list(history.unbind(0)), coeffs), predict(history, coeffs))


def test_predict_into_out_and_validation():
    g = torch.Generator().manual_seed(4)
    history, coeffs = torch.randn(3, 4, 6, generator=g), torch.randn(3, 6, generator=g)
    out = torch.empty(4, 6)
    assert predict(history, coeffs, out) is out
    # arbitrary weights may cancel: the bound is relative to the terms, not the result
    assert ((out.double() - naive(history, coeffs)).abs() <= 8 * torch.finfo().eps * scale(history, coeffs)).all()
    with pytest.raises(ValueError, match="do not match"):
        predict(history, torch.randn(2, 6))
    with pytest.raises(ValueError, match="out must be"):
        predict(history, coeffs, torch.empty(4, 6, dtype=torch.float64))


def test_history_copies_never_aliases():
    hist = ResidualHistory(3)
    residual = torch.ones(2, 4)
    hist.push(residual)
    residual.mul_(5)  # ComfyUI blocks modify tensors in place after the residual is taken
    assert torch.equal(hist.views()[0], torch.ones(2, 4))
    prediction = hist.predict(torch.ones(1, 4))
    prediction.add_(1)
    assert torch.equal(hist.views()[0], torch.ones(2, 4))


def test_history_order_after_wrap_around():
    hist = ResidualHistory(3)
    for i in range(7):
        hist.push(torch.full((2, 4), float(i)))
        assert len(hist) == min(i + 1, 3)
    assert [v[0, 0].item() for v in hist.views()] == [4.0, 5.0, 6.0]
    assert hist.slots() == [1, 2, 0]  # data was not rotated


@pytest.mark.parametrize("pushes,k", [(p, k) for p in range(1, 7) for k in range(1, min(p, 3) + 1)])
def test_history_predict_uses_newest_k_in_order(pushes, k):
    g = torch.Generator().manual_seed(pushes * 10 + k)
    hist = ResidualHistory(3)
    pushed = [torch.randn(5, 4, generator=g) for _ in range(pushes)]
    for r in pushed:
        hist.push(r)
    coeffs = torch.randn(k, 4, generator=g)
    expected = naive(pushed[-k:], coeffs)
    torch.testing.assert_close(hist.predict(coeffs).double(), expected, rtol=1e-5, atol=1e-5)


def test_history_drop_newest():
    hist = ResidualHistory(3)
    for i in range(4):
        hist.push(torch.full((2,), float(i)))
    hist.drop_newest()
    hist.push(torch.full((2,), 9.0))  # replaces 3.0, the step was recomputed
    assert [v[0].item() for v in hist.views()] == [1.0, 2.0, 9.0]
    for _ in range(3):
        hist.drop_newest()
    with pytest.raises(IndexError):
        hist.drop_newest()


def test_history_storage_options_and_nbytes():
    hist = ResidualHistory(4, dtype=torch.bfloat16, device="cpu")
    assert hist.nbytes == 0 and hist.dtype == torch.bfloat16 and hist.device == torch.device("cpu")
    hist.push(torch.randn(1, 16, 8))
    assert hist.nbytes == 4 * 16 * 8 * 2
    assert hist.views()[0].dtype == torch.bfloat16
    assert ResidualHistory(2).nbytes == 0
    plain = ResidualHistory(2)
    plain.push(torch.randn(3, 8, dtype=torch.float64))
    assert plain.dtype == torch.float64 and plain.nbytes == 2 * 3 * 8 * 8


def test_history_errors_and_clear():
    hist = ResidualHistory(2)
    hist.push(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="clear"):
        hist.push(torch.zeros(5, 4))
    with pytest.raises(ValueError, match="2 coefficient rows but 1"):
        hist.predict(torch.ones(2, 4))
    hist.clear()
    assert len(hist) == 0 and hist.nbytes == 0
    hist.push(torch.zeros(5, 4))  # a new shape is fine after clear()
    assert len(hist) == 1
    with pytest.raises(ValueError):
        ResidualHistory(0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_prepared_weights_predict_the_same(dtype):
    g = torch.Generator().manual_seed(5)
    history = torch.randn(3, 4, 8, generator=g).to(dtype)
    coeffs = pool_coefficients(3, 8, seed=4)
    prepared = prepare(coeffs, dtype, "cpu")
    assert torch.equal(predict(history, prepared), predict(history, coeffs))
    other = torch.float64 if dtype != torch.float64 else torch.float32
    with pytest.raises(ValueError, match="prepared for"):
        predict(history.to(other), prepared)


needs_compiler = pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")),
                                    reason="torch.compile needs a C++ compiler on CPU")


@needs_compiler
@pytest.mark.parametrize("m,dtype", [(2, torch.bfloat16), (3, torch.float32), (4, torch.float32),
                                     (4, torch.bfloat16)])
def test_fused_kernel_sums_ring_buffer_views(m, dtype, monkeypatch):
    """The kernel torch.compile builds, over a wrapped-around history, under inference mode as in ComfyUI."""
    monkeypatch.setattr(fused, "MIN_ELEMENTS", 1)  # residuals this small are otherwise left to the eager ops
    g = torch.Generator().manual_seed(m)
    hist = ResidualHistory(m)
    with torch.inference_mode():
        for _ in range(m + 2):
            hist.push(torch.randn(2, 5, 8, generator=g).to(dtype))
        coeffs = pool_coefficients(m, 8, seed=m)
        weights = hist.prepare(coeffs, fused=True)
        assert weights.fused.dtype == torch.float32  # half precision accumulates in fp32
        out = torch.empty(2, 5, 8, dtype=dtype)
        assert fused.weighted_sum(hist.views(), weights.fused, out) is out  # built, not fallen back
        assert torch.equal(hist.predict(weights), out)
    expected = naive(hist.views(), coeffs)
    # fp32 sums, rounded once into the history's dtype
    bound = torch.finfo(dtype).eps * expected.abs() + 8 * torch.finfo().eps * scale(hist.views(), coeffs)
    assert ((out.double() - expected).abs() <= bound).all()


def test_fused_kernel_only_where_it_beats_the_eager_ops():
    def fused_weights(coeffs, dtype=torch.float32, device="cpu"):
        return prepare(coeffs, dtype, device, fused=True).fused

    assert fused_weights(pool_coefficients(3, 8)) is not None
    assert fused_weights(pool_coefficients(2, 8)) is None  # one lerp reads both terms at once
    assert fused_weights(pool_coefficients(2, 8), torch.bfloat16) is not None
    assert fused_weights(torch.randn(2, 8)) is not None  # not affine: the eager ops take two passes
    assert fused_weights(torch.ones(1, 4)) is None and not fused.supports(5)
    assert fused_weights(pool_coefficients(3, 8), device="meta") is None  # off the CPU: call overhead
    small = torch.randn(3, 4, 8)
    weights = prepare(torch.randn(3, 8), torch.float32, "cpu", fused=True)
    assert small[0].numel() < fused.MIN_ELEMENTS
    assert torch.equal(predict(small, weights), predict_module._addcmul_chain(small, weights.coeffs,
                                                                              torch.empty(4, 8)))


def test_fused_predict_falls_back_where_compiling_fails(tmp_path):
    """No working C++ compiler (and an empty inductor cache): one warning, then the eager ops' result."""
    script = (
        "import torch\n"
        "from hyca_core import fused\n"
        "from hyca_core.predict import predict, prepare\n"
        "fused.MIN_ELEMENTS = 1\n"
        "history, coeffs = torch.randn(3, 4, 8), torch.rand(3, 8)\n"
        "weights = prepare(coeffs, torch.float32, 'cpu', fused=True)\n"
        "eager = predict(history, prepare(coeffs, torch.float32, 'cpu'))\n"
        "for _ in range(2):\n"
        "    assert torch.equal(predict(history, weights), eager)\n"
    )
    env = {**os.environ, "CXX": str(tmp_path / "no-compiler"), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cache")}
    run = subprocess.run([sys.executable, "-c", script], env=env, cwd=Path(__file__).parents[2],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stderr.count("could not build the fused predict kernel on cpu") == 1, run.stderr
    assert "InvalidCxxCompiler" in run.stderr
