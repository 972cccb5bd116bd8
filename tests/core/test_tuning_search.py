"""The local search of where a tuned N's full steps go (`tuning.search`), on scores with a known optimum."""

import numpy as np

from hyca_core.schedule import Schedule
from hyca_core.tuning import moves, search

WARMUP = 2


def test_a_move_shifts_one_full_step_after_the_warm_up_onto_a_predicted_neighbour():
    mask = np.array([1, 1, 0, 0, 1, 0, 1], dtype=bool)  # warm-up 2, full steps 4 and 6
    found = {tuple(np.flatnonzero(m)) for m in moves(mask, WARMUP)}
    assert found == {(0, 1, 3, 6), (0, 1, 5, 6), (0, 1, 4, 5)}
    assert all(m.sum() == mask.sum() and m[:WARMUP].all() for m in moves(mask, WARMUP))


def _distance_to(target):
    """A score that rises as the full steps near ``target``'s, 0 there."""
    return lambda mask: -float(np.abs(np.flatnonzero(mask) - np.flatnonzero(target)).sum())


def test_the_search_climbs_to_the_best_placement_and_keeps_its_count():
    start = Schedule(interval=4, warmup=WARMUP).mask(20)
    target = np.zeros(20, dtype=bool)
    target[[0, 1, 4, 9, 13, 19]] = True
    assert target.sum() == start.sum() and not np.array_equal(target, start)
    score = _distance_to(target)
    mask, best, spent = search(start, score(start), WARMUP, score, replays=200)
    assert np.array_equal(mask, target) and best == 0.0 and spent <= 200


def test_the_search_spends_no_more_replays_than_given_and_never_ends_worse():
    start = Schedule(interval=4, warmup=WARMUP).mask(20)
    target = np.zeros(20, dtype=bool)
    target[[0, 1, 4, 9, 13, 19]] = True
    score = _distance_to(target)
    for replays in (1, 3, 7):
        mask, best, spent = search(start, score(start), WARMUP, score, replays)
        assert spent <= replays and best == score(mask) and best >= score(start)


def test_a_diverged_replay_never_wins():
    start = Schedule(interval=4, warmup=WARMUP).mask(20)
    mask, best, spent = search(start, 10.0, WARMUP, lambda _: float("nan"), replays=50)
    assert np.array_equal(mask, start) and best == 10.0 and spent > 0
