"""A map's verdict at a run's N: HyCa's lead over plain sampling at equal compute, measured at a tuned N,
interpolated between tuned N in full steps, or bounded by a tuned N on one side."""

import pytest

from hyca_core.tuning import LEAD, Candidate, Tuned, Verdict, verdict

STEPS = 30  # full steps of the every-N schedule at warm-up 2: N=4 9, N=5 7, N=6 6, N=8 5


def _tuned(**leads):
    """N -> a tuning whose HyCa scores ``lead`` dB above plain dpmpp_2m, keyed n4=... for N=4."""
    return {int(n[1:]): Tuned(Candidate(2, "fixed"), 30.0 + lead, 5, "dpmpp_2m", 30.0)
            for n, lead in leads.items()}


def test_a_tuned_n_has_its_measured_lead():
    found = verdict(_tuned(n4=6.0, n8=-4.0), 8, STEPS)
    assert (found.lead, found.kind, found.basis, found.recommended) == (-4.0, "measured", (8,), False)


@pytest.mark.parametrize("interval, lead", [(5, 1.0), (6, -1.5)])
def test_between_tuned_n_the_lead_is_interpolated_in_full_steps(interval, lead):
    # N=5 computes 7 steps, halfway from N=4's 9 to N=8's 5; N=6 computes 6, three quarters of the way
    found = verdict(_tuned(n4=6.0, n8=-4.0), interval, STEPS)
    assert found.lead == pytest.approx(lead) and found.kind == "interpolated" and found.basis == (4, 8)
    assert found.recommended == (lead >= LEAD)


def test_beyond_the_tuned_n_only_a_bound_that_decides_is_a_verdict():
    losing, winning = _tuned(n4=0.5), _tuned(n4=3.0)
    assert verdict(losing, 6, STEPS) == Verdict(0.5, "at most", (4,))
    assert verdict(winning, 3, STEPS).kind == "at least" and verdict(winning, 3, STEPS).recommended
    assert verdict(winning, 6, STEPS) is None  # a win at N=4 says nothing of N=6
    assert verdict(losing, 3, STEPS) is None  # nor a loss at N=4 of N=3
    assert verdict({}, 4, STEPS) is None
