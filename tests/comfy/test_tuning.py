"""Closed-loop tuning (HyCa Calibrate's `tune`) on the trained reference model, and HyCa Apply following
a map's tuning."""

import logging
from dataclasses import replace

import numpy as np
import pytest
import torch

from harness import reference_model, sampling
from harness.metrics import latent_psnr

from .conftest import LATENT

STEPS, SEED, CFG = 12, 3, 1.0  # 12 steps: the 3x budget tunes the default N=4 and warm-up 1 there


@pytest.fixture(scope="module")
def wan():
    return reference_model.load()


@pytest.fixture(scope="module")
def tuned(pack, wan):
    """The probe's map, tuned, with the number of model computations the tuning ran (block 0's calls)."""
    latent = {"samples": reference_model.empty_latent(1)}
    conditioning = reference_model.conditioning(4), reference_model.unconditional()
    schedule = pack.hyca_core.schedule.Schedule(interval=4)
    solver_map, _ = pack.nodes.calibrate_node.probe(wan, SEED, STEPS, CFG, "euler", "simple", *conditioning,
                                                    latent, schedule)
    calls = []
    hook = wan.model.diffusion_model.blocks[0].register_forward_hook(lambda *_: calls.append(1))
    try:
        runs = pack.nodes.calibrate_node.KSamplerRuns(wan, SEED, STEPS, CFG, "euler", "simple", *conditioning,
                                                      latent)
        tuned_map, result = pack.nodes.tuning_runs.tune(runs, solver_map)
    finally:
        hook.remove()
    return tuned_map, result, len(calls), conditioning


def test_tuning_keeps_the_candidate_closest_to_a_held_out_run_within_budget(pack, wan, tuned):
    tuned_map, result, calls, conditioning = tuned
    assert calls == result.computed <= 3 * STEPS  # the count is what the model ran, within 3 probes
    assert sorted(result.tuned) == [4] and tuned_map.info["tuned_seed"] == SEED + 1
    Candidate = pack.hyca_core.tuning.Candidate
    assert {Candidate(2, "fixed"), Candidate(2, "calibrated"), "euler", "dpmpp_2m"} < result.scores[4].keys()
    assert any(isinstance(c, Candidate) and c.warmup == 1 for c in result.scores[4])
    reference = reference_model.sample(wan, [4], seed=SEED + 1, steps=STEPS, cfg=CFG)
    for n, chosen in result.tuned.items():
        candidates = {k: v for k, v in result.scores[n].items() if isinstance(k, Candidate)}
        best, default = max(candidates, key=candidates.get), pack.hyca_core.tuning.DEFAULT
        switch = candidates[best] - candidates[default] > pack.hyca_core.tuning.SWITCH_MARGIN
        kept = best if switch else default
        assert len(candidates) >= 2 and chosen.candidate == kept and chosen.psnr == candidates[kept]
        # the score is the held-out seed's, measured again here through apply_hyca
        schedule = pack.hyca_core.schedule.Schedule(interval=n, warmup=chosen.candidate.warmup)
        patched = pack.nodes.apply_hyca.apply_hyca(wan, tuned_map, schedule,
                                                   placement=chosen.candidate.placement)
        replayed = sampling.sample(patched, *conditioning, reference_model.empty_latent(1), steps=STEPS,
                                   cfg=CFG, seed=SEED + 1)
        assert latent_psnr(replayed, reference) == pytest.approx(chosen.psnr, abs=1e-3)
        plain = sampling.sample(wan, *conditioning, reference_model.empty_latent(1), steps=chosen.computed,
                                cfg=CFG, seed=SEED + 1, sampler=chosen.plain_sampler)
        assert latent_psnr(plain, reference) == pytest.approx(chosen.plain_psnr, abs=1e-3)


def test_auto_mode_tunes_on_replays_of_the_users_run_as_calibrate_does(pack, wan, tuned, tmp_path,
                                                                         monkeypatch, caplog):
    """HyCa Apply without a map: the first full run's image is full compute's; its map is tuned on replays of
    that run from the next seed, which sample exactly what Calibrate's own runs sample (the same reference
    and plain runs score the same), within the same budget."""
    tuned_map, result, _, conditioning = tuned
    map_store = pack.nodes.map_store
    monkeypatch.setattr(map_store, "search_folders", lambda: [tmp_path / "hyca", tmp_path / "none"])
    patched = pack.nodes.apply_hyca.apply_hyca(wan, None, pack.hyca_core.schedule.Schedule(interval=4))
    calls = []
    hook = wan.model.diffusion_model.blocks[0].register_forward_hook(lambda *_: calls.append(1))
    try:
        with caplog.at_level(logging.INFO):
            first = sampling.sample(patched, *conditioning, reference_model.empty_latent(1), steps=STEPS,
                                    cfg=CFG, seed=SEED)
    finally:
        hook.remove()
    full = sampling.sample(wan, *conditioning, reference_model.empty_latent(1), steps=STEPS, cfg=CFG,
                           seed=SEED)
    torch.testing.assert_close(first, full, rtol=0, atol=0)
    (path,) = (tmp_path / "hyca").glob("*")
    saved = pack.hyca_core.solver_map.SolverMap.load(path)
    assert saved.info["auto"] and saved.info["tuned_seed"] == SEED + 1
    auto = pack.hyca_core.tuning.from_info(saved.info)
    assert auto.keys() == result.tuned.keys()
    for n, entry in auto.items():
        assert (entry.plain_sampler, entry.plain_psnr) == pytest.approx(
            (result.tuned[n].plain_sampler, result.tuned[n].plain_psnr), abs=1e-3)
    assert len(calls) <= STEPS + 3 * STEPS  # the user's run, then the tuning's budget
    assert "HyCa: tuned N=4" in caplog.text
    assert "calibrated and tuned from this run; map saved to" in caplog.text


def test_a_search_keeps_a_placement_only_where_apply_then_comes_closer(pack, wan, tuned):
    """HyCa Calibrate's search: Apply's run from the tuning's seed at N=4 comes closer to that seed's full run
    with the searched placement than the tuned one did, at the same compute. The map keeps the tuning's
    score, which its verdict reads (a search's best of many replays of one run would flatter it)."""
    tuned_map, result, _, conditioning = tuned
    runs = pack.nodes.calibrate_node.KSamplerRuns(wan, SEED, STEPS, CFG, "euler", "simple", *conditioning,
                                                  {"samples": reference_model.empty_latent(1)})
    searched_map, _ = pack.nodes.tuning_runs.tune(runs, tuned_map, search=8)
    found = pack.hyca_core.tuning.from_info(searched_map.info)[4]
    assert found.searched is not None and found.searched[0] == STEPS  # this model and seed: it pays
    assert len(found.searched[1]) == result.tuned[4].computed
    assert found.psnr == pytest.approx(result.tuned[4].psnr, abs=1e-3)  # the info keeps 3 decimals
    assert latent_psnr(runs.replay(None, 4, searched_map), runs.full()) > found.psnr


def test_a_tuned_map_round_trips_and_a_malformed_tuning_is_refused(pack, tuned, tmp_path):
    tuned_map = tuned[0]
    path = tuned_map.save(tmp_path / "tuned.hyca.safetensors")
    loaded = pack.hyca_core.solver_map.SolverMap.load(path)
    assert loaded.info["tuned"] == tuned_map.info["tuned"]
    assert pack.hyca_core.tuning.from_info(loaded.info) == pack.hyca_core.tuning.from_info(tuned_map.info)
    entry = next(iter(tuned_map.info["tuned"].values()))
    searched = {"steps": 12, "full": [0, 1, 5, 9]}
    assert replace(tuned_map, info={"tuned": {"5": {**entry, "searched": searched}}}).save(
        tmp_path / "searched.hyca.safetensors").exists()
    for bad in ({"5": {**entry, "placement": "anywhere"}}, {"5": {**entry, "psnr": float("nan")}},
                {str(n): entry for n in range(1, 40)}, {"five": entry},
                {"5": {**entry, "searched": {**searched, "full": [5, 1]}}},
                {"5": {**entry, "searched": {**searched, "full": [0, 12]}}}):
        with pytest.raises(pack.hyca_core.solver_map.MapError, match="info tuned"):
            replace(tuned_map, info={"tuned": bad}).save(tmp_path / "bad.hyca.safetensors")
    assert not (tmp_path / "bad.hyca.safetensors").exists()


def _tuned_as(solver_map, **entries):
    """The map with a tuning of N -> (warm-up, placement, HyCa dB, plain dB)."""
    tuning = {str(n): {"warmup": w, "placement": p, "psnr": x, "computed": 4,
                       "plain": {"sampler": "dpmpp_2m", "psnr": y}} for n, (w, p, x, y) in entries.items()}
    return replace(solver_map, info={**solver_map.info, "tuned": tuning})


def test_a_searched_placement_serves_its_n_and_step_count_only(pack, flux, solver_map, conditioning,
                                                             finished, caplog):
    """A map whose tuning searched N=4's full steps for 12-step runs: Apply runs exactly those steps there,
    and the tuned placement at another step count, another N or where the user set a placement."""
    Schedule, tuning = pack.hyca_core.schedule.Schedule, pack.hyca_core.tuning
    tuned_map = _tuned_as(solver_map, **{"4": (2, "fixed", 30.0, 25.0)})
    fixed = Schedule(interval=4, warmup=2).mask(12)
    moved = tuning.moves(fixed, 2)[-1]
    found = tuning.from_info(tuned_map.info)[4].with_mask(moved)
    searched = pack.nodes.tuning_runs.with_tuning(tuned_map, {4: found}, seed=1)

    def apply(interval, **options):
        schedule = Schedule(interval=interval)
        return pack.nodes.apply_hyca.apply_hyca(flux, searched, schedule, tuned_warmup=True, **options)

    runs = [(apply(4), 4, 12, moved), (apply(4), 4, 16, None), (apply(6), 6, 12, None),
            (apply(4, placement="fixed"), 4, 12, fixed), (apply(4, window=(0.0, 0.9)), 4, 12, "not searched")]
    for patched, interval, steps, expected in runs:
        finished.clear()
        with caplog.at_level(logging.INFO):
            sampling.sample(patched, *conditioning, torch.zeros(LATENT), steps=steps)
        (state,) = finished
        if isinstance(expected, str):  # a window computes its ends: the tuned placement inside it
            assert not np.array_equal(state.run_map.mask, moved)
            continue
        if expected is None:
            expected = Schedule(interval=interval, warmup=2).mask(steps)
        assert np.array_equal(state.run_map.mask, expected), (interval, steps)
    assert caplog.text.count("searched placement") == 1


def test_apply_follows_the_tuning_of_the_nearest_n_and_says_where_fewer_steps_win(
        pack, flux, solver_map, conditioning, finished, caplog):
    tuned_map = _tuned_as(solver_map, **{"4": (1, "calibrated", 30.0, 32.5)})
    plain = pack.nodes.apply_node.HyCaCacheSpeedUp
    (patched,) = plain.execute(flux, speed_up=2.0, solver_map=tuned_map).args  # 12 steps: N=3
    with caplog.at_level(logging.INFO):
        sampling.sample(patched, *conditioning, torch.zeros(LATENT), steps=12)
    (state,) = finished
    Schedule = pack.hyca_core.schedule.Schedule
    import comfy.samplers

    sigmas = comfy.samplers.calculate_sigmas(flux.get_model_object("model_sampling"), "simple", 12).numpy()
    fixed = Schedule(interval=3, warmup=1).mask(12)
    expected = pack.hyca_core.run_maps.run_map(tuned_map, sigmas[:-1], Schedule(interval=3, warmup=1),
                                               budget=int(fixed.sum())).mask
    assert np.array_equal(state.run_map.mask, expected) and not np.array_equal(expected, fixed)
    assert "tuned for N=4 (the nearest tuned N to N=3): warm-up 1, calibrated placement" in caplog.text
    # plain sampling won at N=4, which says nothing of the smaller N=3 run
    assert "Lower the sampler's steps" not in caplog.text
    assert "N=3 is not measured against plain sampling (tuned: N=4 -2.5 dB)" in caplog.text


def test_apply_warns_where_the_tuning_puts_hycas_lead_under_a_db(pack, flux, solver_map, conditioning,
                                                                 caplog):
    """The verdicts of `tuning.verdict` reach the log (and the node) with their figures: a 12-step probe,
    N=3 (5 full steps) +10 dB, N=6 (3 full steps) -2.5 dB; N=4 (4 full steps) lies halfway."""
    tuned_map = _tuned_as(solver_map, **{"3": (2, "fixed", 40.0, 30.0), "6": (2, "fixed", 30.0, 32.5)})
    apply = pack.nodes.apply_hyca.apply_hyca
    for interval, says, warns in (
            (3, "HyCa leads plain sampling with as many full steps (5) by +10.0 dB in calibration", False),
            (4, "by +3.8 dB, interpolated between N=3's +10.0 dB and N=6's -2.5 dB", False),
            (6, "(3) by -2.5 dB in calibration, under the 2 dB that shows a real lead: 3 plain steps of "
                "dpmpp_2m", True),
            (8, "by -2.5 dB at most (N=6's -2.5 dB; a larger N strays further)", True)):
        caplog.clear()
        patched = apply(flux, tuned_map, pack.hyca_core.schedule.Schedule(interval=interval, warmup=2))
        with caplog.at_level(logging.INFO):
            sampling.sample(patched, *conditioning, torch.zeros(LATENT), steps=12)
        assert says in caplog.text, interval
        assert warns == ("Lower the sampler's steps instead" in caplog.text), interval


@pytest.mark.parametrize("steps", [4, 8, 9])
def test_a_few_step_run_is_told_that_fewer_plain_steps_came_closer(pack, flux, solver_map, conditioning,
                                                                   caplog, steps):
    """The verdict of benchmarks/bench_few_step.py (and the 8-step rows of bench_quality.py) in the log of
    the run it concerns: for runs of 8 steps or fewer, not for longer ones, nor where nothing is predicted."""
    schedule = pack.hyca_core.schedule.Schedule(interval=2, warmup=2)
    apply = pack.nodes.apply_hyca.apply_hyca
    for interval in (2, 1):
        caplog.clear()
        patched = apply(flux, solver_map, pack.hyca_core.schedule.Schedule(interval=interval, warmup=2))
        with caplog.at_level(logging.INFO):
            sampling.sample(patched, *conditioning, torch.zeros(LATENT), steps=steps)
        computed = int(schedule.mask(steps).sum())
        told = f"a {steps}-step run takes steps too far apart" in caplog.text
        assert told == (interval == 2 and steps <= pack.nodes.map_source.FEW_STEPS), (interval, steps)
        assert not told or f"as many full steps ({computed} here)" in caplog.text


def test_explicit_advanced_settings_override_the_tuning(pack, flux, solver_map, conditioning, finished):
    tuned_map = _tuned_as(solver_map, **{"3": (1, "calibrated", 40.0, 30.0)})
    advanced = pack.nodes.apply_node.HyCaApply
    settings = dict(interval=3, final_steps=0, fitted=False, granularity="auto", history_dtype="auto",
                    offload_history=False)
    masks = []
    for warmup, placement in ((0, "auto"), (2, "fixed")):
        (patched,) = advanced.execute(flux, **settings, warmup=warmup, placement=placement,
                                      solver_map=tuned_map).args
        sampling.sample(patched, *conditioning, torch.zeros(LATENT), steps=12)
        masks.append(finished[-1].run_map.mask)
    tuned, explicit = masks
    assert np.array_equal(explicit, pack.hyca_core.schedule.Schedule(3, 2).mask(12))
    assert tuned[0] and not tuned[1] and not np.array_equal(tuned, explicit)  # warm-up 1, the tuned one


@pytest.mark.parametrize("placement", ["fixed", "calibrated"])
def test_a_tuned_warmup_followed_at_another_n_adds_no_full_step(pack, flux, solver_map, conditioning,
                                                                 finished, caplog, placement):
    """Tuned at N=5, warm-up 3 computes no more than warm-up 2 (12 steps: 4 full steps each); at N=4 it
    would compute 5 where the every-N schedule computes 4: fixed placement keeps warm-up 2, calibrated
    keeps warm-up 3 and places one step fewer."""
    tuned_map = _tuned_as(solver_map, **{"5": (3, placement, 40.0, 30.0)})
    Schedule = pack.hyca_core.schedule.Schedule
    assert Schedule(5, 3).mask(12).sum() == Schedule(5, 2).mask(12).sum() == 4
    assert Schedule(4, 3).mask(12).sum() == 5 and Schedule(4, 2).mask(12).sum() == 4
    patched = pack.nodes.apply_hyca.apply_hyca(flux, tuned_map, Schedule(interval=4, warmup=2),
                                               tuned_warmup=True)
    with caplog.at_level(logging.INFO):
        sampling.sample(patched, *conditioning, torch.zeros(LATENT), steps=12)
    mask = finished[-1].run_map.mask
    assert mask.sum() == 4
    followed = f"tuned for N=5 (the nearest tuned N to N=4): warm-up 3, {placement} placement, 40.0 dB"
    if placement == "fixed":
        assert np.array_equal(mask, Schedule(4, 2).mask(12))
        assert f"{followed} in calibration; warm-up 2 here" in caplog.text
    else:
        assert mask[:3].all()
        assert f"{followed} in calibration\n" in caplog.text
