"""Auto mode (HyCa Apply without a map) on a tiny real FLUX: it calibrates only from a run that denoises the
whole schedule, and a calibration that fails never loses the run's image and is not retried on every run.
"""

import logging

import torch

from harness import sampling, tiny_models

LATENT = (1, 16, 16, 16)
STEPS = 12


def _auto(pack, model):
    schedule = pack.hyca_core.schedule.Schedule(interval=2, warmup=2)
    return pack.nodes.apply_hyca.apply_hyca(model, None, schedule)


def test_only_a_run_over_the_whole_schedule_calibrates(pack, flux, conditioning, hyca_folder, caplog):
    patched = _auto(pack, flux)
    latent = torch.randn(LATENT, generator=torch.Generator().manual_seed(2))
    with caplog.at_level(logging.INFO):
        sampling.sample(patched, *conditioning, latent, steps=STEPS, denoise=0.4)  # img2img
    assert "not calibrating from this 12-step run (it covers sigma 0.4" in caplog.text
    assert not list(hyca_folder.glob("*"))

    import comfy.sample

    caplog.clear()
    noise = comfy.sample.prepare_noise(torch.zeros(LATENT), 0)
    with caplog.at_level(logging.INFO):  # an advanced sampler's first 7 of 12 steps
        comfy.sample.sample(patched, noise, STEPS, 1.0, "euler", "simple", *conditioning, torch.zeros(LATENT),
                            last_step=7, force_full_denoise=False, disable_pbar=True, seed=0)
    assert "not calibrating from this 7-step run" in caplog.text and not list(hyca_folder.glob("*"))

    caplog.clear()
    with caplog.at_level(logging.INFO):
        sampling.sample(patched, *conditioning, torch.zeros(LATENT), steps=STEPS)
    assert "calibrating from this 12-step run (sigma 1 to 0)" in caplog.text
    assert len(list(hyca_folder.glob("*"))) == 1


def test_a_failed_calibration_keeps_the_image_and_is_not_retried(pack, conditioning, hyca_folder, caplog):
    """A block whose residuals are NaN makes the probe's statistics non-finite (the recorder keeps any
    finite range, issue 16 item 3). The run's image (NaN too: the model's own) comes back, auto mode
    warns once and then samples at full compute."""
    model = tiny_models.build(tiny_models.FLUX_SMALLEST, seed=1)
    with torch.no_grad():
        model.model.diffusion_model.double_blocks[0].img_attn.proj.weight[0, 0] = float("nan")
    patched = _auto(pack, model)
    with caplog.at_level(logging.INFO):
        first = sampling.sample(patched, *conditioning, torch.zeros(LATENT), steps=STEPS)
    assert "calibrating from this run failed" in caplog.text and "stops calibrating" in caplog.text
    full = sampling.sample(model, *conditioning, torch.zeros(LATENT), steps=STEPS)
    # the image of a calibrating run is the full-compute image
    torch.testing.assert_close(first, full, rtol=0, atol=0, equal_nan=True)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        again = sampling.sample(patched, *conditioning, torch.zeros(LATENT), steps=STEPS)
    torch.testing.assert_close(again, full, rtol=0, atol=0, equal_nan=True)
    assert "calibrat" not in caplog.text
    assert not list(hyca_folder.glob("*"))


def test_a_history_that_does_not_fit_falls_back_before_it_is_allocated(pack, flux, solver_map, conditioning,
                                                                       finished, caplog):
    """A budget below what the fp32 history takes: the histories that do not fit are held in bf16; a budget
    nothing fits in: the run computes every step, exactly the unpatched model's result."""
    Schedule = pack.hyca_core.schedule.Schedule

    def run(**options):
        patched = pack.nodes.apply_hyca.apply_hyca(flux, solver_map, Schedule(interval=2, warmup=2),
                                                   **options)
        return sampling.sample(patched, *conditioning, torch.zeros(LATENT), steps=STEPS)

    run()
    fp32_bytes = finished[-1].peak_bytes
    budget = fp32_bytes * 3 // 4
    with caplog.at_level(logging.WARNING):
        run(memory_budget=budget)
    state = finished[-1]
    dtypes = {h.dtype for b in state.branches.values() for h in b.histories.values()}
    assert dtypes == {torch.bfloat16} and state.predicted and state.peak_bytes <= budget  # all moved to bf16
    assert "held on cpu in bfloat16 instead" in caplog.text

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        out = run(memory_budget=1)
    assert "this run computes every step from here" in caplog.text and finished[-1].predicted == 0
    assert torch.equal(out, sampling.sample(flux, *conditioning, torch.zeros(LATENT), steps=STEPS))
