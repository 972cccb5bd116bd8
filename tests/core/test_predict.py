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
from harness.synthetic import flow_sigmas
from hyca_core.predict import ResidualHistory, predict, prepare
from hyca_core.solvers import MAX_HISTORY, POOL, TIME_VARIABLES, time_axis

compiler = shutil.which("g++") or shutil.which("c++")


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
        assert predict_module.lerp_weights(pool_coefficients(m, 16)) is not None
    assert predict_module.lerp_weights(torch.randn(3, 4)) is None  # not affine
    assert predict_module.lerp_weights(torch.tensor([[1.0], [-1.0], [1.0]])) is None  # P_1 = 0
    assert predict_module.lerp_weights(torch.tensor([[-20.0], [21.0]])) is None  # |w| = 21
    zero_padded = torch.tensor([[0.0], [0.0], [-1.0], [2.0]])  # taylor1 in a 4-slot history
    torch.testing.assert_close(predict_module.lerp_weights(zero_padded),
                               torch.tensor([[0.0], [1.0], [2.0]], dtype=torch.float64))


def flow_schedule_coefficients(steps=28, interval=3):
    """(MAX_HISTORY, channels) weights of every pool member in both time variables, one channel per
    predicted step of an N=`interval` run on a real (shifted) flow schedule, zero-padded to MAX_HISTORY."""
    sigmas = flow_sigmas(steps, 3.0)
    computed = np.arange(0, steps, interval)
    columns = []
    for member in POOL:
        for variable in TIME_VARIABLES:
            axis = time_axis(variable, np.arange(steps), sigmas)
            for last in range(MAX_HISTORY - 1, len(computed)):
                times = axis[computed[last - member.history + 1:last + 1]]
                for target in axis[computed[last] + 1:min(computed[last] + interval, steps)]:
                    w = np.zeros(MAX_HISTORY)
                    w[MAX_HISTORY - member.history:] = member.weights(times, target)
                    columns.append(w)
    return torch.tensor(np.array(columns).T, dtype=torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("path", ["eager", "eager onto a base", "fused", "fused onto a base"])
def test_half_history_predicts_a_constant_channel_within_its_rounding(dtype, path, monkeypatch):
    """Weights rounded to half precision no longer sum to 1: a channel constant over the steps came out
    biased (up to 12% with second-order members).  Weights and sums stay fp32: one rounding at most."""
    if path.startswith("fused"):
        if not compiler:
            pytest.skip("torch.compile needs a C++ compiler on CPU")
        monkeypatch.setattr(fused, "MIN_ELEMENTS", 1)
    coeffs = flow_schedule_coefficients()
    constant = torch.linspace(0.3, 3.0, coeffs.shape[1]).to(dtype)  # a value per channel, as stored
    history = constant.expand(MAX_HISTORY, 2, -1)
    weights = prepare(coeffs, dtype, "cpu", fused=path.startswith("fused"))
    base = torch.linspace(-2.0, 2.0, coeffs.shape[1]).to(dtype).expand(2, -1) if "base" in path else None
    with torch.inference_mode():
        result = predict(history, weights) if base is None else predict(history, weights, base=base)
    expected = constant.double() if base is None else base.double() + constant.double()
    # rounded to nearest once (half an ulp), after an fp32 sum that may cancel to about 0
    terms = scale(history, coeffs) + (0 if base is None else base.double().abs())
    bound = torch.finfo(dtype).eps / 2 * expected.abs() + 8 * torch.finfo().eps * terms
    assert ((result.double() - expected).abs() <= bound).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 2, 4])
@pytest.mark.parametrize("onto", [None, torch.float32, torch.bfloat16])
def test_half_history_sums_in_fp32_and_rounds_once(dtype, m, onto, monkeypatch):
    """Also over several row chunks (the CPU's mixed-dtype path) and onto a base of either precision."""
    monkeypatch.setattr(predict_module, "_CHUNK_ELEMENTS", 12)  # 10 rows of 8 in several chunks
    g = torch.Generator().manual_seed(m)
    history = torch.randn(m, 10, 8, generator=g).to(dtype)
    coeffs = pool_coefficients(m, 8, seed=2)
    base = None if onto is None else torch.randn(10, 8, generator=g).to(onto)
    result = predict(history, coeffs, base=base)
    assert result.dtype == (dtype if base is None else onto)
    expected = naive(history, coeffs) + (0 if base is None else base.double())
    terms = scale(history, coeffs) + (0 if base is None else base.double().abs())
    bound = torch.finfo(result.dtype).eps / 2 * expected.abs() + 8 * torch.finfo().eps * terms
    assert ((result.double() - expected).abs() <= bound).all()


def test_predict_accepts_a_sequence_of_views():
    history, coeffs = torch.randn(3, 4, 6), pool_coefficients(3, 6, seed=3)
    torch.testing.assert_close(predict(list(history.unbind(0)), coeffs), predict(history, coeffs))


def test_predict_into_out_and_validation():
    g = torch.Generator().manual_seed(4)
    history, coeffs = torch.randn(3, 4, 6, generator=g), torch.randn(3, 6, generator=g)
    out = torch.empty(4, 6)
    assert predict(history, coeffs, out) is out
    # arbitrary weights may cancel: the bound is relative to the terms, not the result
    bound = 8 * torch.finfo().eps * scale(history, coeffs)
    assert ((out.double() - naive(history, coeffs)).abs() <= bound).all()
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


def test_weights_for_a_base_skip_the_lerp_form_and_predict_the_same():
    """The block patch always sums onto the block's input, which the lerp chain does not serve: weights
    prepared for a base leave its weights out, and the sums onto a base are the same bits."""
    g = torch.Generator().manual_seed(6)
    history, base = torch.randn(3, 4, 8, generator=g), torch.randn(4, 8, generator=g)
    coeffs = pool_coefficients(3, 8, seed=4)
    ordinary = prepare(coeffs, torch.float32, "cpu")
    for_base = prepare(coeffs, torch.float32, "cpu", with_base=True)
    assert ordinary.lerp is not None and for_base.lerp is None
    assert torch.equal(predict(history, for_base, base=base), predict(history, ordinary, base=base))
    assert torch.allclose(predict(history, for_base), predict(history, ordinary), rtol=1e-5, atol=1e-6)


needs_compiler = pytest.mark.skipif(not compiler, reason="torch.compile needs a C++ compiler on CPU")


@needs_compiler
@pytest.mark.parametrize("m,dtype", [(2, torch.bfloat16), (3, torch.float32), (4, torch.float32),
                                     (4, torch.bfloat16)])
@pytest.mark.parametrize("onto", [None, torch.float32, torch.bfloat16])
def test_fused_kernel_sums_ring_buffer_views(m, dtype, onto, monkeypatch):
    """The kernel torch.compile builds, over a wrapped-around history, under inference mode as in ComfyUI,
    alone and onto a block input of either precision."""
    monkeypatch.setattr(fused, "MIN_ELEMENTS", 1)  # residuals this small are otherwise left to the eager ops
    g = torch.Generator().manual_seed(m)
    hist = ResidualHistory(m)
    base = None if onto is None else torch.randn(2, 5, 8, generator=g).to(onto)
    with torch.inference_mode():
        for _ in range(m + 2):
            hist.push(torch.randn(2, 5, 8, generator=g).to(dtype))
        coeffs = pool_coefficients(m, 8, seed=m)
        weights = hist.prepare(coeffs, fused=True)
        assert weights.fused.dtype == torch.float32  # half precision accumulates in fp32
        out = torch.empty(2, 5, 8, dtype=dtype if base is None else base.dtype)
        assert fused.weighted_sum(hist.views(), weights.fused, out, base) is out  # built, not fallen back
        assert torch.equal(hist.predict(weights, base=base), out)
    expected = naive(hist.views(), coeffs) + (0 if base is None else base.double())
    terms = scale(hist.views(), coeffs) + (0 if base is None else base.double().abs())
    # fp32 sums, rounded once into the result's dtype
    bound = torch.finfo(out.dtype).eps / 2 * expected.abs() + 8 * torch.finfo().eps * terms
    assert ((out.double() - expected).abs() <= bound).all()


def test_fused_kernel_only_where_it_beats_the_eager_ops(monkeypatch):
    """The kernel is tried for 2 to 5 terms (a base is one), large residuals, CPU-held histories, and not for
    two fp32 terms a single lerp reads at once."""
    tried = []
    monkeypatch.setattr(fused, "MIN_ELEMENTS", 40)
    # records which sums reach the kernel; None is what it returns where compiling failed: the eager ops run
    monkeypatch.setattr(fused, "weighted_sum", lambda terms, w, out, base: tried.append(len(terms)))

    def attempts(coeffs, dtype=torch.float32, onto=None, rows=5, device="cpu"):
        tried.clear()
        history = torch.randn(len(coeffs), rows, 8).to(dtype)
        weights = prepare(coeffs, dtype, device, fused=True)
        base = None if onto is None else torch.randn(rows, 8).to(onto)
        if weights.fused is not None:
            predict(history, weights, base=base)
        return weights.fused is not None, list(tried)

    assert attempts(pool_coefficients(3, 8)) == (True, [3])
    assert attempts(pool_coefficients(2, 8)) == (True, [])  # one lerp reads both terms at once
    assert attempts(pool_coefficients(2, 8), onto=torch.float32) == (True, [2])  # but not the base
    assert attempts(pool_coefficients(2, 8), torch.bfloat16) == (True, [2])
    assert attempts(torch.randn(2, 8)) == (True, [2])  # not affine: the eager ops take two passes
    assert attempts(torch.ones(1, 8)) == (True, [])  # a single mul is one pass
    assert attempts(pool_coefficients(4, 8), onto=torch.bfloat16) == (True, [4])
    assert attempts(pool_coefficients(3, 8), rows=4) == (True, [])  # 32 elements: the call costs more
    assert attempts(torch.randn(5, 8)) == (False, []) and not fused.supports(6)
    assert prepare(pool_coefficients(3, 8), torch.float32, "meta", fused=True).fused is None  # call overhead


def test_terms_no_channel_weighs_are_never_read():
    """Each channel pays for the terms weighed at all, not for a dense table's zero rows."""
    history = torch.randn(4, 3, 6)
    history[0] = history[2] = float("nan")  # 0 * nan would be nan
    coeffs = pool_coefficients(4, 6, seed=1)
    coeffs[0] = coeffs[2] = 0
    weights = prepare(coeffs, torch.float32, "cpu")
    assert weights.rows == (1, 3) and weights.terms == 4
    assert torch.equal(predict(history, weights), predict(history[[1, 3]], coeffs[[1, 3]]))


@pytest.mark.parametrize("m", [1, 2, 3, 4])
@pytest.mark.parametrize("kind", ["arbitrary", "pool-random"])
def test_predict_onto_a_base_is_the_old_sum_then_add_fp32(m, kind):
    """One pass per term onto the block input: within fp32 rounding of predicting, then adding the input."""
    g = torch.Generator().manual_seed(m)
    history, base = torch.randn(m, 2, 5, 8, generator=g), torch.randn(2, 5, 8, generator=g)
    coeffs = torch.randn(m, 8, generator=g) if kind == "arbitrary" else pool_coefficients(m, 8, seed=m)
    old = predict(history, coeffs) + base
    new = predict(history, coeffs, base=base)
    assert new.dtype == torch.float32 and not new.requires_grad
    bound = 8 * torch.finfo().eps * (scale(history, coeffs) + base.double().abs())
    assert ((new.double() - old.double()).abs() <= bound).all()
    assert ((new.double() - old.double()).abs() <= 1e-5 * old.double().abs().clamp_min(1)).all()
    in_place = base.clone()
    assert predict(history, coeffs, out=in_place, base=in_place) is in_place
    assert torch.equal(in_place, new)
    grad = base.clone().requires_grad_()  # samplers not run under no_grad: out= refuses autograd inputs
    assert torch.equal(predict(history, coeffs, base=grad), new)


def test_predict_onto_a_base_elsewhere():
    """A base on another device (an offloaded history): the result is on the base's device, in its dtype."""
    history, coeffs = torch.randn(2, 3, 8), pool_coefficients(2, 8)
    base = torch.empty(3, 8, dtype=torch.float16, device="meta")
    result = predict(history, coeffs, base=base)
    assert result.device.type == "meta" and result.dtype == torch.float16 and result.shape == (3, 8)
    with pytest.raises(ValueError, match="out must be"):
        predict(history, coeffs, out=torch.empty(3, 8, dtype=torch.float16), base=base)
    with pytest.raises(ValueError, match="base must be"):
        predict(history, coeffs, base=torch.zeros(4, 8))


@pytest.mark.parametrize("storage", [None, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("activations", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk", [12, 1 << 16])
def test_push_difference_stores_what_push_of_the_difference_did(storage, activations, chunk, monkeypatch):
    """The residual goes straight into the history's slot, rounded once as pushing after - before was."""
    monkeypatch.setattr(predict_module, "_CHUNK_ELEMENTS", chunk)  # 12: 10 rows of 8 in several chunks
    g = torch.Generator().manual_seed(0)
    direct, copied = ResidualHistory(2, storage), ResidualHistory(2, storage)
    for _ in range(3):
        before = torch.randn(1, 10, 8, generator=g).to(activations)
        after = (before + torch.randn(1, 10, 8, generator=g)).to(activations).requires_grad_()
        direct.push_difference(after, before)
        copied.push(after.detach() - before)
        before.add_(1)  # blocks modify their inputs in place afterwards
    assert all(torch.equal(a, b) for a, b in zip(direct.views(), copied.views()))
    assert direct.views()[0].dtype == (storage or activations)
    with pytest.raises(ValueError, match="differ in shape"):
        direct.push_difference(after, before[:, :5])
    with pytest.raises(ValueError, match="clear"):
        direct.push_difference(after[:, :5], before[:, :5])


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
    env = {**os.environ, "CXX": str(tmp_path / "no-compiler"),
           "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cache")}
    run = subprocess.run([sys.executable, "-c", script], env=env, cwd=Path(__file__).parents[2],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stderr.count("could not build the fused predict kernel on cpu") == 1, run.stderr
    assert "InvalidCxxCompiler" in run.stderr
