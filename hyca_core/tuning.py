"""Closed-loop tuning: per interval N, the schedule a map's runs predict best with, chosen by the image.

The probe's open-loop next-step error does not tell which warm-up or placement gives the closer image, so
each candidate is replayed (the whole sampling, the cache in the loop) and scored by the `latent_psnr` of
its final output against a full-compute reference. The reference is a run the map was not calibrated on
(another noise seed): replaying the probe itself overstates HyCa, since the map was fitted on it. Plain
sampling with fewer steps at the same compute is scored too: where it comes closer, the map says so.

Cost is counted in model computations (sampler steps computed fully) against `BUDGET` full runs of the
probe, the reference run included. That does not cover every interval at a typical step count: the
default N is tuned first (what Apply runs unless asked otherwise), then the others cheapest first while
their runs fit; an untuned interval follows the nearest tuned one. Warm-up variants take what is left,
except where HyCa loses: there the longest warm-up comes first (a loss bounds every larger interval).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from . import defaults
from .closeness import latent_psnr
from .schedule import Schedule

PLACEMENTS = ("fixed", "calibrated")
WARMUPS = (1, 2, 3)  # longer warm-ups let longer-history pool members in, at the cost of full steps
INTERVALS = (3, 4, 6, 8)
PLAIN_SAMPLERS = ("euler", "dpmpp_2m")  # first order, and the stock second-order multistep sampler
BUDGET = 3.0  # the whole tuning, reference run included, in full-compute runs of the probe
# dB by which the tuning must find HyCa ahead of plain sampling at equal compute for a map to recommend it
# at an N: the 1 dB asked of HyCa, plus about 1 dB by which the one reference run (the probe's prompt,
# another seed) overstated HyCa's lead over held-out prompts on the reference models (README).
LEAD = 2.0
# dB by which a candidate must beat the default (warm-up 2, fixed placement) on the one reference run to
# replace it: on the reference models, gaps of up to 0.5 dB there reversed on held-out prompts (README).
SWITCH_MARGIN = 1.0
MAX_TUNED = 32  # intervals a map may hold tuning for: bounds the map's info
MAX_INTERVAL = 10_000
MAX_STEPS = 10_000  # a searched placement's run length (HyCa Calibrate's steps go as far)
MAX_PSNR = 1000.0  # a bound for validation only; finite scores stay far below


@dataclass(frozen=True)
class Candidate:
    warmup: int
    placement: str

    def label(self) -> str:
        return f"warm-up {self.warmup}, {self.placement} placement"


BASELINES = tuple(Candidate(defaults.WARMUP, p) for p in PLACEMENTS)  # always scored first
DEFAULT = BASELINES[0]  # what Apply runs untuned


@dataclass(frozen=True)
class Tuned:
    """What tuning found at one interval: the best candidate and its score, and the best plain run at the
    same compute (`computed` model computations of the every-N schedule with the default warm-up)."""

    candidate: Candidate
    psnr: float
    computed: int
    plain_sampler: str
    plain_psnr: float
    # a placement searched from the candidate's (`search`): the full steps of a run of that many steps
    searched: tuple[int, tuple[int, ...]] | None = None

    @property
    def lead(self) -> float:
        """HyCa's dB over the best plain run at the same compute."""
        return self.psnr - self.plain_psnr

    def mask(self, steps: int) -> np.ndarray | None:
        """The searched placement's mask (True = full compute) for a run of ``steps`` steps, None for
        another step count or without a search."""
        if self.searched is None or self.searched[0] != steps:
            return None
        mask = np.zeros(steps, dtype=bool)
        mask[list(self.searched[1])] = True
        return mask

    def with_mask(self, mask: np.ndarray) -> Tuned:
        return replace(self, searched=(len(mask), tuple(int(s) for s in np.flatnonzero(mask))))

    def to_info(self) -> dict:
        info = {"warmup": self.candidate.warmup, "placement": self.candidate.placement,
                "psnr": round(self.psnr, 3), "computed": self.computed,
                "plain": {"sampler": self.plain_sampler, "psnr": round(self.plain_psnr, 3)}}
        if self.searched is not None:
            info["searched"] = {"steps": self.searched[0], "full": list(self.searched[1])}
        return info

    @classmethod
    def from_info(cls, entry: dict) -> Tuned:
        plain, searched = entry["plain"], entry.get("searched")
        return cls(Candidate(entry["warmup"], entry["placement"]), entry["psnr"], entry["computed"],
                   plain["sampler"], plain["psnr"],
                   None if searched is None else (searched["steps"], tuple(searched["full"])))


@dataclass
class Tuning:
    """A tuning's outcome: per tuned interval what won, every score (for ranking studies), the cost."""

    tuned: dict[int, Tuned]
    scores: dict[int, dict[Candidate | str, float]]  # per N: candidate or plain sampler -> dB
    computed: int  # model computations spent, the reference run included
    budget: int


def computed_steps(steps: int, interval: int, warmup: int = defaults.WARMUP) -> int:
    """Full computations of a `steps`-step run at this interval and warm-up (calibrated placement keeps
    the same number)."""
    return int(Schedule(interval=interval, warmup=warmup).mask(steps).sum())


def intervals_for(steps: int, intervals=INTERVALS) -> list[int]:
    """The intervals worth tuning for a run of `steps` steps, those that predict some step, in the order
    tuning spends its budget on them: the default N, then the others cheapest first."""
    useful = [n for n in intervals if computed_steps(steps, n) < steps]
    return sorted(useful, key=lambda n: (n != defaults.INTERVAL, computed_steps(steps, n)))


def tune(replay: Callable[[Candidate, int], object], plain: Callable[[str, int], object], reference,
         steps: int, intervals=INTERVALS, budget: float = BUDGET,
         progress: Callable[[int, int], None] | None = None) -> Tuning:
    """Score candidates per interval against `reference` (a full-compute output of `steps` steps the map
    was not calibrated on) and keep the best; `replay(candidate, n)` and `plain(sampler, steps)` return
    the final output of that run from the reference's noise and conditioning.

    First, per interval (in `intervals_for`'s order, while the budget holds): both placements at the
    default warm-up and the plain samplers at the same compute; then, with what is left, the other
    warm-ups at the better placement, each only if it computes no more than that compute. An interval
    whose two placements do not fit gets the default alone. Where HyCa is not LEAD ahead of plain
    sampling, the longest warm-up comes at once, and if HyCa is still not, larger intervals are skipped:
    the verdict bounds them by that loss. The default stays unless a candidate beats it by
    more than SWITCH_MARGIN."""
    limit = int(budget * steps)
    spent = steps  # the reference run
    scores: dict[int, dict[Candidate | str, float]] = {}

    def score(n: int, key, output, cost: int) -> None:
        nonlocal spent
        spent += cost
        value = latent_psnr(output, reference)
        if math.isfinite(value):  # a diverged run (NaN) or an exact copy ranks nowhere
            scores[n][key] = value
        if progress is not None:
            progress(min(spent, limit), limit)

    def warmups(n: int, which=WARMUPS) -> None:  # at n's better placement, at no more compute than n's
        best = _choice(scores[n], BASELINES)
        for warmup in which if best is not None else ():
            candidate = Candidate(warmup, best.placement)
            cost = computed_steps(steps, n, warmup)
            if candidate in scores[n] or cost > computed_steps(steps, n) or spent + cost > limit:
                continue
            score(n, candidate, replay(candidate, n), cost)

    bounded_above = math.inf  # HyCa lost at this N: `verdict` bounds every larger one without replays
    for n in intervals_for(steps, intervals):
        cost = computed_steps(steps, n)
        # both placements where the budget holds them, else the default alone: a verdict needs only one
        both = spent + (len(BASELINES) + len(PLAIN_SAMPLERS)) * cost <= limit
        candidates = BASELINES if both else (DEFAULT,)
        if n > bounded_above or spent + (len(candidates) + len(PLAIN_SAMPLERS)) * cost > limit:
            continue
        scores[n] = {}
        for candidate in candidates:
            score(n, candidate, replay(candidate, n), cost)
        for sampler in PLAIN_SAMPLERS:
            score(n, sampler, plain(sampler, cost), cost)
        if _lead(scores[n]) < LEAD:  # not recommended: first the longest warm-up (longer histories)
            warmups(n, WARMUPS[-1:])
            if _lead(scores[n]) < LEAD:
                bounded_above = min(bounded_above, n)
    for n in scores:
        warmups(n)
    tuned = {}
    for n, table in scores.items():
        best, sampler = _picks(table)
        if best is not None and sampler is not None:
            tuned[n] = Tuned(best, table[best], computed_steps(steps, n), sampler, table[sampler])
    return Tuning(tuned, scores, spent, limit)


def moves(mask: np.ndarray, warmup: int) -> list[np.ndarray]:
    """Every mask with one full step after the warm-up moved by one step onto a predicted one (as many full
    steps as before), earliest first."""
    out = []
    for step in np.flatnonzero(mask):
        for target in (step - 1, step + 1):
            if step >= warmup and warmup <= target < len(mask) and not mask[target]:
                moved = mask.copy()
                moved[[step, target]] = [False, True]
                out.append(moved)
    return out


def search(start: np.ndarray, start_psnr: float, warmup: int, score: Callable[[np.ndarray], float],
           replays: int) -> tuple[np.ndarray, float, int]:
    """Hill-climb from the mask ``start`` (scoring ``start_psnr``) over `moves`, each scored by a replay
    (``score``: its latent PSNR against the reference), keeping the best move of each round while it
    improves, until none does or ``replays`` are spent; returns the mask, its score and the replays spent.
    On the reference models the placement found this way beat both placements on held-out prompts at every
    N (README, "A searched placement pays")."""
    best_mask, best, spent = start, start_psnr, 0
    while spent < replays:
        trials = moves(best_mask, warmup)[:replays - spent]
        if not trials:
            break
        spent += len(trials)
        scores = [score(mask) for mask in trials]
        top = int(np.argmax(scores))
        if not scores[top] > best:  # NaN (a diverged replay) never wins
            break
        best_mask, best = trials[top], scores[top]
    return best_mask, best, spent


def _best(table: dict, keys):
    scored = [k for k in keys if k in table]
    return max(scored, key=table.__getitem__) if scored else None


def _picks(table: dict):
    """The kept candidate and the best plain sampler of one interval's scores (None where none scored)."""
    return _choice(table, [k for k in table if isinstance(k, Candidate)]), _best(table, PLAIN_SAMPLERS)


def _lead(table: dict) -> float:
    """HyCa's kept candidate over the best plain sampler in one interval's scores (-inf if either is
    missing)."""
    best, sampler = _picks(table)
    return -math.inf if best is None or sampler is None else table[best] - table[sampler]


def _choice(table: dict, candidates):
    """The best candidate, or the default unless the best beats it by more than SWITCH_MARGIN."""
    best = _best(table, candidates)
    if DEFAULT in table and best is not None and table[best] - table[DEFAULT] <= SWITCH_MARGIN:
        return DEFAULT
    return best


def nearest(tuned: dict[int, Tuned], interval: int) -> tuple[int, Tuned] | None:
    """The tuning for `interval`, or for the nearest tuned one (ties: the smaller, which computes more)."""
    if not tuned:
        return None
    n = min(tuned, key=lambda k: (abs(k - interval), k))
    return n, tuned[n]


@dataclass(frozen=True)
class Verdict:
    """HyCa against plain sampling at equal compute at one N, from a map's tuning: its ``lead`` in dB is
    "measured" at a tuned N, "interpolated" (in full steps) between the tuned N either side, or bounded by
    a tuned N ``basis``: "at most" a smaller N's (HyCa's lead shrinks as N grows), "at least" a larger's."""

    lead: float
    kind: str
    basis: tuple[int, ...]

    @property
    def recommended(self) -> bool:
        return self.lead >= LEAD


def verdict(tuned: dict[int, Tuned], interval: int, probe_steps: int) -> Verdict | None:
    """The verdict at ``interval``, None where the tuning says nothing of it (beyond the tuned N on a side
    where the bound does not decide)."""
    if interval in tuned:
        return Verdict(tuned[interval].lead, "measured", (interval,))
    below = [n for n in tuned if n < interval]
    above = [n for n in tuned if n > interval]
    if below and above:
        a, b = max(below), min(above)
        full = {n: computed_steps(probe_steps, n) for n in (a, b, interval)}
        share = (full[a] - full[interval]) / (full[a] - full[b]) if full[a] != full[b] else 0.5
        return Verdict(tuned[a].lead + share * (tuned[b].lead - tuned[a].lead), "interpolated", (a, b))
    if below and tuned[max(below)].lead < LEAD:
        return Verdict(tuned[max(below)].lead, "at most", (max(below),))
    if above and tuned[min(above)].lead >= LEAD:
        return Verdict(tuned[min(above)].lead, "at least", (min(above),))
    return None


def to_info(tuned: dict[int, Tuned]) -> dict:
    """A map info's "tuned" entry for this tuning (what `from_info` reads back)."""
    return {str(n): t.to_info() for n, t in sorted(tuned.items())}


def from_info(info: dict) -> dict[int, Tuned]:
    """A map info's tuning (checked by `check_info`), {} if it holds none."""
    return {int(n): Tuned.from_info(entry) for n, entry in info.get("tuned", {}).items()}


def check_info(value) -> None:
    """Raise ValueError unless `value` is what `Tuning.to_info` makes: at most MAX_TUNED intervals, each
    with a known warm-up, placement and plain sampler and finite scores."""
    if not isinstance(value, dict) or len(value) > MAX_TUNED:
        raise ValueError(f"must map at most {MAX_TUNED} intervals to their tuning")
    for n, entry in value.items():
        if not (isinstance(n, str) and n.isdecimal() and 1 <= int(n) <= MAX_INTERVAL):
            raise ValueError(f"interval {n!r} is not a number of steps")
        plain = entry.get("plain") if isinstance(entry, dict) else None
        keys = {"warmup", "placement", "psnr", "computed", "plain"}
        ok = (isinstance(entry, dict) and keys <= entry.keys() <= keys | {"searched"}
              and _is_searched(entry.get("searched"))
              and entry["warmup"] in WARMUPS and type(entry["warmup"]) is int
              and entry["placement"] in PLACEMENTS
              and _is_int(entry["computed"], MAX_INTERVAL) and _is_score(entry["psnr"])
              and isinstance(plain, dict) and plain.keys() == {"sampler", "psnr"}
              and plain["sampler"] in PLAIN_SAMPLERS and _is_score(plain["psnr"]))
        if not ok:
            raise ValueError(f"the tuning for N={n} is malformed")


def _is_searched(value) -> bool:
    """None, or a searched placement: a step count and its full steps, distinct and in order."""
    if value is None:
        return True
    if not (isinstance(value, dict) and value.keys() == {"steps", "full"}
            and _is_int(value["steps"], MAX_STEPS) and isinstance(value["full"], list)):
        return False
    full = value["full"]
    return all(type(s) is int for s in full) and full == sorted(set(full)) and all(
        0 <= s < value["steps"] for s in full)


def _is_int(value, most: int) -> bool:
    return type(value) is int and 1 <= value <= most


def _is_score(value) -> bool:
    return type(value) in (int, float) and math.isfinite(value) and abs(value) <= MAX_PSNR
