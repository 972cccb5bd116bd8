"""Which candidate closed-loop tuning keeps: the default, unless another beats it on the reference run by
more than SWITCH_MARGIN (smaller gaps on one run reversed on held-out prompts)."""

import pytest
import torch

from hyca_core.tuning import DEFAULT, SWITCH_MARGIN, Candidate, tune, verdict

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


def _thirty_steps(plain_psnr: float, warmup3_psnr: float):
    """A 30-step tuning at N=4 and N=8: the 3x budget holds both placements and the plain runs at both,
    or, where HyCa loses at N=4, warm-up 3 there and the default alone at N=8."""
    scores = {DEFAULT: 30.0, Candidate(2, "calibrated"): 29.0, Candidate(1, "fixed"): 28.0,
              Candidate(3, "fixed"): warmup3_psnr}
    result = tune(lambda candidate, n: _output(scores[candidate]), lambda sampler, steps: _output(plain_psnr),
                  REFERENCE, 30, intervals=(4, 8))
    assert result.computed <= result.budget
    return result


def test_where_hyca_wins_both_placements_are_replayed_at_both_intervals():
    result = _thirty_steps(plain_psnr=25.0, warmup3_psnr=30.5)
    assert sorted(result.tuned) == [4, 8] and Candidate(3, "fixed") not in result.scores[4]
    assert {DEFAULT, Candidate(2, "calibrated")} <= result.scores[8].keys()


def test_where_hyca_loses_the_longest_warm_up_comes_first_and_the_loss_bounds_larger_n():
    result = _thirty_steps(plain_psnr=35.0, warmup3_psnr=30.5)
    assert {Candidate(3, "fixed"), Candidate(1, "fixed")} <= result.scores[4].keys()
    assert sorted(result.tuned) == [4]
    found = verdict(result.tuned, 8, 30)
    assert found.kind == "at most" and not found.recommended


def test_a_warm_up_that_turns_the_loss_leaves_the_default_alone_at_the_larger_n():
    result = _thirty_steps(plain_psnr=33.0, warmup3_psnr=36.0)
    assert result.tuned[4].candidate == Candidate(3, "fixed") and result.tuned[4].lead == pytest.approx(3.0)
    assert [k for k in result.scores[8] if isinstance(k, Candidate)] == [DEFAULT]
    assert [verdict(result.tuned, n, 30).kind for n in (6, 8)] == ["interpolated", "measured"]
