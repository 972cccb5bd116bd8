"""Which candidate closed-loop tuning keeps: the default, unless another beats it on the reference run by
more than SWITCH_MARGIN (smaller gaps on one run reversed on held-out prompts)."""

import pytest
import torch

from hyca_core.tuning import DEFAULT, SWITCH_MARGIN, Candidate, tune

STEPS = 12  # the 3x budget covers N=4's baselines, plain runs and warm-up 1 (tests/comfy/test_tuning.py)
REFERENCE = torch.linspace(0.0, 1.0, 1000)  # peak 1: an output off by e everywhere scores -20 log10(e) dB


def _output(psnr: float) -> torch.Tensor:
    return REFERENCE + 10 ** (-psnr / 20)


def _tuning(calibrated_psnr: float, warmup1_psnr: float = 20.0):
    scores = {DEFAULT: 30.0, Candidate(2, "calibrated"): calibrated_psnr, Candidate(1, "fixed"): warmup1_psnr,
              Candidate(1, "calibrated"): warmup1_psnr}
    return tune(lambda candidate, n: _output(scores[candidate]), lambda sampler, steps: _output(25.0),
                REFERENCE, STEPS, intervals=(4,))


@pytest.mark.parametrize("gap, kept", [(SWITCH_MARGIN - 0.1, DEFAULT),
                                       (SWITCH_MARGIN + 0.1, Candidate(2, "calibrated"))])
def test_the_default_stays_unless_beaten_by_the_margin(gap, kept):
    result = _tuning(30.0 + gap)
    assert result.scores[4][Candidate(2, "calibrated")] == pytest.approx(30.0 + gap)
    assert result.tuned[4].candidate == kept
    assert result.tuned[4].psnr == pytest.approx(result.scores[4][kept])
    assert result.tuned[4].lead == pytest.approx(result.tuned[4].psnr - 25.0)


def test_warm_ups_are_tried_at_the_kept_placement_and_win_by_the_margin_too():
    near = _tuning(30.5, warmup1_psnr=30.9)  # calibrated within the margin: warm-up 1 tried fixed, kept out
    assert Candidate(1, "fixed") in near.scores[4] and Candidate(1, "calibrated") not in near.scores[4]
    assert near.tuned[4].candidate == DEFAULT
    far = _tuning(30.5, warmup1_psnr=31.5)
    assert far.tuned[4].candidate == Candidate(1, "fixed")
