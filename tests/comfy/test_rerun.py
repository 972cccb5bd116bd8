"""`model_wrappers.Rerun`: a finished run sampled again from inside HyCa's OUTER_SAMPLE wrapper (auto mode's
tuning replays) is the run itself, with real CFG against a negative prompt too, and changes only what it
is asked to."""

import pytest
import torch

from harness import sampling

from .conftest import LATENT

STEPS = 6


@pytest.mark.parametrize("cfg", [1.0, 3.0])
def test_a_rerun_repeats_the_run_and_changes_only_its_arguments(pack, flux, conditioning, hyca_folder,
                                                                monkeypatch, cfg):
    apply_run = pack.nodes.apply_run
    finish = apply_run.ApplyRunState.finish
    reruns = []

    def rerun_then_finish(state, completed, rerun=None):
        if rerun is not None:
            RunState = pack.nodes.run_state.RunState
            again = rerun(RunState())
            noise = torch.randn(rerun.argument("noise").shape, generator=torch.Generator().manual_seed(7))
            other = rerun(RunState(), noise=noise)
            reruns.append((again, other, noise))
        finish(state, completed, None)  # no tuning: this test is about the rerun alone

    monkeypatch.setattr(apply_run.ApplyRunState, "finish", rerun_then_finish)
    patched = pack.nodes.apply_hyca.apply_hyca(flux, None, pack.hyca_core.schedule.Schedule(interval=2))
    first = sampling.sample(patched, *conditioning, torch.zeros(LATENT), steps=STEPS, cfg=cfg, seed=3)
    (again, other, noise), = reruns
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    import comfy.sample

    expected = comfy.sample.sample(flux, noise, STEPS, cfg, "euler", "simple", *conditioning,
                                   torch.zeros(LATENT), disable_pbar=True, seed=3)
    torch.testing.assert_close(other, expected, rtol=0, atol=0)
