"""HyCa Apply's run-time knobs on a tiny real FLUX sampled through ComfyUI: a target speed-up instead of N,
and the start/end window of the denoising outside which every step computes fully.

Which steps a run computed is read from its own run state when the run finishes, not from the schedule.
"""

import logging

import numpy as np
import pytest
import torch

from harness import sampling
from harness.metrics import latent_psnr

LATENT = (1, 16, 16, 16)
N, WARMUP = 2, 2  # as the conftest's solver_map


def _apply(pack, model, solver_map, **knobs):
    """Through HyCa Apply's node. The knobs not given are left out, as an older workflow leaves them."""
    inputs = dict(interval=N, warmup=WARMUP, final_steps=0, fitted=True, granularity="block",
                  history_dtype="auto", offload_history=False)
    node = pack.nodes.apply_node.HyCaApply
    (patched,) = node.execute(model, **{**inputs, **knobs}, solver_map=solver_map).result
    return patched


def _run(model, conditioning, finished, steps):
    """Sample; return the output and which steps the run computed (True) and predicted (False)."""
    out = sampling.sample(model, *conditioning, torch.zeros(LATENT), steps=steps, seed=5)
    (branch,) = finished[-1].branches.values()  # cfg 1: one conditioning branch
    return out, np.array([not branch.decided[step] for step in range(steps)])


def _step_sigmas(model, steps):
    import comfy.samplers

    model_sampling = model.get_model_object("model_sampling")
    return model_sampling, comfy.samplers.calculate_sigmas(model_sampling, "simple", steps).numpy()[:-1]


def test_target_speedup_picks_each_runs_interval(pack, flux, solver_map, conditioning, finished, caplog):
    """2.5x asked: 20 steps take N=3 (8 computed: 2.5x), 12 steps N=4 (4 computed: 3x; N=3 gives 2.4x)."""
    Schedule = pack.hyca_core.schedule.Schedule
    patched = _apply(pack, flux, solver_map, target_speedup=2.5)
    for steps, interval, logged in ((20, 3, "2.50x fewer block computations (N=3, fixed placement;"),
                                  (12, 4, "3.00x fewer block computations (N=4, fixed placement;")):
        caplog.clear()
        with caplog.at_level(logging.INFO):
            out, computed = _run(patched, conditioning, finished, steps)
        assert np.array_equal(computed, Schedule(interval, WARMUP).mask(steps))
        assert logged in caplog.text
        full = sampling.sample(flux, *conditioning, torch.zeros(LATENT), steps=steps, seed=5)
        quality = latent_psnr(out, full)
        logging.getLogger(__name__).warning("measured: %d steps at 2.5x asked: N=%d, PSNR %.1f dB",
                                            steps, interval, quality)
        assert quality > 62  # measured 70.7 (20 steps) and 67.6 dB (12 steps)


def test_window_computes_every_step_before_start_and_after_end(pack, flux, solver_map, conditioning,
                                                               finished):
    steps, Schedule = 20, pack.hyca_core.schedule.Schedule
    model_sampling, sigmas = _step_sigmas(flux, steps)
    start, end = model_sampling.percent_to_sigma(0.2), model_sampling.percent_to_sigma(0.8)
    outside = (sigmas > start) | (sigmas < end)
    assert outside[WARMUP:].any() and outside[-1] and not outside.all()  # the window matters here
    window = dict(start_percent=0.2, end_percent=0.8)
    _, computed = _run(_apply(pack, flux, solver_map, **window), conditioning, finished, steps)
    # the every-N pattern starts where the window opens
    assert np.array_equal(computed, Schedule(N, WARMUP).within(sigmas, start, end).mask(steps))
    assert computed[outside].all() and not computed[~outside].all(), (computed, outside)


def test_window_uses_the_model_sampling_of_the_run(pack, flux, solver_map, conditioning, finished):
    """A ModelSamplingFlux placed after HyCa Apply shifts the sigmas and the window's percents with them."""
    from comfy_extras.nodes_model_advanced import ModelSamplingFlux

    steps, Schedule = 20, pack.hyca_core.schedule.Schedule
    (shifted,) = ModelSamplingFlux().patch(_apply(pack, flux, solver_map, start_percent=0.5), max_shift=3.0,
                                           base_shift=0.5, width=1024, height=1024)
    model_sampling, sigmas = _step_sigmas(shifted, steps)
    _, computed = _run(shifted, conditioning, finished, steps)
    expected = Schedule(N, WARMUP).within(sigmas, model_sampling.percent_to_sigma(0.5)).mask(steps)
    assert np.array_equal(computed, expected)
    stale = flux.get_model_object("model_sampling").percent_to_sigma(0.5)  # of the model Apply was given
    assert not np.array_equal(expected, Schedule(N, WARMUP).within(sigmas, stale).mask(steps))


def test_default_knobs_change_nothing(pack, flux, solver_map, conditioning, finished):
    """start 0, end 1, no target: the run map fitted exactly as before these knobs, so the run is the same bit
    for bit, whether the inputs are given or left out (older workflows)."""
    steps = 12
    default, computed = _run(_apply(pack, flux, solver_map), conditioning, finished, steps)
    run_map = finished[-1].run_map
    explicit, _ = _run(_apply(pack, flux, solver_map, target_speedup=0.0, start_percent=0.0, end_percent=1.0),
                       conditioning, finished, steps)
    _, sigmas = _step_sigmas(flux, steps)
    schedule = pack.hyca_core.schedule.Schedule(N, WARMUP)
    before = pack.hyca_core.run_maps.run_map(solver_map, sigmas, schedule, fitted=True)  # as _apply
    assert np.array_equal(computed, before.mask) and np.array_equal(run_map.mask, before.mask)
    assert run_map.tables.keys() == before.tables.keys()
    for key, table in before.tables.items():
        assert table.keys() == run_map.tables[key].keys()
        assert all(np.array_equal(weights, run_map.tables[key][step]) for step, weights in table.items())
    assert torch.equal(default, explicit)


def test_new_inputs_are_optional_with_tooltips_and_checked(pack, flux, solver_map):
    apply_node = pack.nodes.apply_node
    inputs = {i.id: i for i in apply_node.HyCaApply.define_schema().inputs}
    assert all(i.tooltip for i in inputs.values())
    assert all(inputs[name].optional
               for name in ("target_speedup", "start_percent", "end_percent", "fused"))
    with pytest.raises(ValueError, match="window"):
        _apply(pack, flux, solver_map, start_percent=0.6, end_percent=0.4)


def test_fused_samples_as_the_eager_ops(pack, flux, solver_map, conditioning, finished, caplog, monkeypatch):
    """fused: torch.compile's single-pass kernels predict what the eager ops do, up to 4-term
    histories (warm-up 4), and the run computes the same steps."""
    monkeypatch.setattr(pack.hyca_core.fused, "MIN_ELEMENTS", 1)  # the tiny model's residuals are small
    steps, knobs = 12, dict(interval=3, warmup=4, fitted=False)
    eager, computed = _run(_apply(pack, flux, solver_map, **knobs), conditioning, finished, steps)
    with caplog.at_level(logging.WARNING):
        fused, fused_computed = _run(_apply(pack, flux, solver_map, fused=True, **knobs),
                                     conditioning, finished, steps)
    assert "could not build" not in caplog.text
    weights = list(finished[-1].weights.values())
    assert max(len(w.coeffs) for w in weights) == 4, "the schedule must exercise the longest histories"
    assert all(w.fused is not None for w in weights if len(w.coeffs) > 2)
    assert np.array_equal(computed, fused_computed) and not computed.all()
    torch.testing.assert_close(fused, eager, rtol=1e-4, atol=1e-4)
