"""The search benchmark's moves: one full step after the warm-up shifted by one step, the count kept."""

import numpy as np

from benchmarks.bench_search import moves


def test_moves_shift_one_full_step_after_the_warmup_onto_a_predicted_neighbour():
    mask = np.array([1, 1, 0, 0, 1, 0, 1], dtype=bool)  # warm-up 2, full steps 4 and 6
    found = {tuple(np.flatnonzero(m)) for m in moves(mask, warmup=2)}
    assert found == {(0, 1, 3, 6), (0, 1, 5, 6), (0, 1, 4, 5)}
    assert all(m.sum() == mask.sum() and m[:2].all() for m in moves(mask, warmup=2))
