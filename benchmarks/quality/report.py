"""What the benchmark prints and writes: the table rows, the targets' verdicts, the timing check,
the equal-time comparison, the sampler matrix and the plots."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .measures import Result
from .methods import ABLATION_N, FEWER_STEP_SAMPLERS, STEPS

CACHE_FAMILIES = ("EasyCache", "EasyCache (input copied)", "LazyCache")
SINGLE_FAMILIES = ("FORA", "Taylor", "TaylorSeer", "TaylorSeer calibrated", "single solver")
ORDER = ["HyCa fixed", "HyCa fitted", "HyCa calibrated", "HyCa warm-up 3", "FORA", "Taylor", "TaylorSeer",
         "TaylorSeer calibrated", "single solver",
         *(f"fewer steps {s}" for s in FEWER_STEP_SAMPLERS), "equal time HyCa", "equal time euler",
         "equal time dpmpp_2m", *CACHE_FAMILIES]

COLUMNS = (
    "columns: stp = sampler steps; blocks = transformer-block executions, counted by forward hooks in an "
    "untimed run of its own; compute = full compute's block executions / this; time = median of the timed "
    "runs (no hook attached; interleaved with full compute and the other methods of its group, order rotated "
    "and reversed round by round); +- = (slowest - fastest) / median of those runs; wall = full compute's "
    "median / this, from the same rounds; bound = Amdahl's bound with free prediction, 1 / (outside x model "
    "passes kept + inside x blocks kept), inside = share of a full run's time inside the blocks (pre/post "
    "hooks, its own run); '!' marks a wall speed-up above its bound by more than the noise (full compute's "
    "+- plus this method's); PSNR = image PSNR (dB, per decoded RGB image, peak 1, mean over the batch) and "
    "SSIM (Gaussian 11x11, sigma 1.5) against full compute; cls= = the classifier's argmax agreeing with "
    "full compute's; mem MB = HyCa's residual-history peak from its own log line (0: no cache, '-': not "
    "known)")
HEADER = (f"{'method':<40}{'stp':>4}{'blocks':>7}{'compute':>8}{'time':>8}{'+-':>6}{'wall':>8}{'bound':>7}"
          f"{'PSNR':>8}{'SSIM':>8}{'cls=':>6}{'mem MB':>8}")


def row(r: Result) -> str:
    flag = "!" if r.timing_fails else " "
    return (f"{r.name:<40}{r.steps:>4}{r.blocks:>7}{r.compute_x:>7.2f}x{r.seconds:>7.2f}s{r.spread:>6.0%}"
            f"{r.wall_x:>7.2f}x{flag}{r.bound:>5.2f}x{r.psnr:>8.2f}{r.ssim:>8.4f}{r.agree:>6.0%}{r.memory:>8}"
            f"  {r.note}").rstrip()


# row() read back: the name may overflow its 40 columns, every other column is right-aligned after it
ROW = re.compile(
    r"^(?P<name>.+?)\s+(?P<steps>\d+)\s+(?P<blocks>\d+)\s+(?P<compute_x>\S+)x\s*(?P<seconds>\S+)s\s*"
    r"(?P<spread>\S+)%\s*(?P<wall_x>\S+)x(?P<flag>[ !])\s*(?P<bound>\S+)x\s+(?P<psnr>\S+)\s+(?P<ssim>\S+)\s+"
    r"(?P<agree>\S+)%\s+(?P<memory>\S+)(?:  (?P<note>.*))?$")


def parse_row(line: str, family: str) -> Result:
    """A :func:`row` line back as a Result (model passes are not in the table: 0)."""
    match = ROW.match(line)
    if match is None:
        raise ValueError(f"not a benchmark table row: {line!r}")
    f = match.groupdict()
    number = re.search(r"N=(\d+)", f["name"])
    return Result(f["name"], family, int(f["steps"]), int(f["blocks"]), 0, float(f["psnr"]), float(f["ssim"]),
                  float(f["agree"]) / 100, f["memory"], compute_x=float(f["compute_x"]),
                  seconds=float(f["seconds"]), spread=float(f["spread"]) / 100, wall_x=float(f["wall_x"]),
                  bound=float(f["bound"]), note=f["note"] or "", n=int(number.group(1)) if number else None)


@dataclass
class Section:
    """One image size's results."""

    size: int
    batch: int
    share: float  # of a full run's time inside the blocks
    cfg: float = 1.0  # every method's guidance in this section
    results: list[Result] = field(default_factory=list)
    full: Result | None = None
    eight: list[Result] = field(default_factory=list)

    def add(self, results: list[Result]) -> None:
        self.results += results

    def family(self, name: str) -> list[Result]:
        return [r for r in self.results if r.family == name]

    @property
    def hyca(self) -> dict[tuple, Result]:
        return {r.key: r for r in self.results if r.family.startswith("HyCa")}

    @property
    def single(self) -> dict[tuple, Result]:
        return {r.key: r for r in self.results if r.family in SINGLE_FAMILIES}

    def at(self, family: str, n: int) -> Result | None:
        return next((r for r in self.family(family) if r.n == n), None)

    def table(self) -> list[str]:
        title = f"=== {self.size} px, batch {self.batch}, {STEPS} steps euler/simple, cfg {self.cfg:g} ==="
        lines = [title, HEADER,
                 row(self.full),
                 (f"  (a full run spends {self.share:.1%} of its time inside the transformer blocks, "
                  f"timed by pre/post forward hooks in a run of its own; {1 - self.share:.1%} outside them)")]
        for family in ORDER:
            members = self.family(family)
            if members:
                lines.append(f"-- {family}")
                lines += [row(r) for r in members]
        lines.append("-- 8-step schedule (PSNR/SSIM/agreement and speed-ups against full compute at 8 steps)")
        lines += [row(r) for r in self.eight]
        return lines

    @classmethod
    def read(cls, lines: list[str]) -> Section:
        """A section back from its :meth:`table` lines: the results with their families, full compute
        and the 8-step schedule (HyCa's keys are not in the table: :attr:`hyca` is empty)."""
        size, batch = map(int, re.match(r"=== (\d+) px, batch (\d+),", lines[0]).groups())
        cfg = float(re.search(r"cfg ([0-9.]+) ===", lines[0]).group(1))
        share = float(re.search(r"spends ([0-9.]+)% of its time inside", lines[3]).group(1)) / 100
        section = cls(size, batch, share, cfg, full=parse_row(lines[2], "full"))
        family = None
        for line in lines[4:]:
            if line.startswith("-- "):
                family = "8-step" if line.startswith("-- 8-step schedule") else line[3:]
            elif family == "8-step":
                section.eight.append(parse_row(line, family))
            else:
                section.add([parse_row(line, family)])
        return section

    def timed(self) -> list[Result]:
        return [r for r in self.results + self.eight if math.isfinite(r.bound) and r.family != "full"]


def read_sections(text: str) -> list[Section]:
    """Every image size's section of a results file (the tables :meth:`Section.table` wrote)."""
    blocks = re.findall(r"^(=== \d+ px, batch .*?)(?:\n\n|\n?\Z)", text, flags=re.MULTILINE | re.DOTALL)
    return [Section.read(block.splitlines()) for block in blocks]


# ----------------------------------------------------------------------------------------------
# targets


def hyca_frontier(points: list[Result]) -> list[tuple[float, float]]:
    """Upper-right envelope (compute speed-up, PSNR) of HyCa's points, sorted by speed-up."""
    pts = sorted(((r.compute_x, r.psnr) for r in points if math.isfinite(r.psnr)),
                 key=lambda p: (-p[0], -p[1]))
    frontier, best = [], -float("inf")
    for x, y in pts:  # from the fastest down: keep points better than every faster one
        if y > best:
            frontier.append((x, y))
            best = y
    return sorted(frontier)


def frontier_at(frontier, x) -> tuple[float | None, str]:
    """HyCa's PSNR at compute speed-up x: interpolated inside its range; below it, its slowest point
    (which is at least as fast, so it is a conservative stand-in); above it, unknown."""
    xs = [p[0] for p in frontier]
    ys = [p[1] for p in frontier]
    if x > xs[-1] + 1e-9:
        return None, "beyond HyCa's measured range"
    if x < xs[0]:
        return ys[0], f"HyCa's slowest frontier point ({xs[0]:.2f}x)"
    return float(np.interp(x, xs, ys)), "interpolated"


def best_at(hyca: dict, n: int) -> Result:
    """HyCa's best variant with the compute of interval n: fixed or fitted solvers, every-N or
    calibrated placement of the same number of full steps."""
    keys = [("fixed", n), ("fitted", n), ("calibrated fixed", n), ("calibrated fitted", n)]
    return max((hyca[k] for k in keys if k in hyca), key=lambda r: r.psnr)


def verdict(ok: bool) -> str:
    return "HOLDS" if ok else "FAILS"


def targets(section: Section, intervals, pool_names) -> list[str]:
    tag = f"[{section.size} px]"
    hyca, single = section.hyca, section.single
    n = ABLATION_N
    best = best_at(hyca, n)
    out = []
    peers = [single[k] for k in (("taylor1", "step", n), ("taylorseer2", "step", n)) if k in single]
    if peers:
        taylor = max(peers, key=lambda r: r.psnr)
        out.append(f"{tag} N={n}: HyCa best ({best.name}, {best.psnr:.2f} dB) vs uniform Taylor best "
                   f"({taylor.name}, {taylor.psnr:.2f} dB): {best.psnr - taylor.psnr:+.2f} dB "
                   f"(target >= +1.5): {verdict(best.psnr - taylor.psnr >= 1.5)}")
    calibrated = single.get(("taylorseer2", "calibrated", n))
    if calibrated is not None and ("taylorseer2", "step", n) in single:
        out.append(f"{tag} N={n}: (ablation, not a target) TaylorSeer on HyCa's calibrated schedule "
                   f"{calibrated.psnr:.2f} dB: the schedule gives TaylorSeer "
                   f"{calibrated.psnr - single['taylorseer2', 'step', n].psnr:+.2f} dB, HyCa's solvers add "
                   f"{best.psnr - calibrated.psnr:+.2f} dB on top")
    fora = single.get(("reuse", "step", n))
    if fora is not None:
        out.append(f"{tag} N={n}: HyCa best vs FORA ({fora.psnr:.2f} dB): {best.psnr - fora.psnr:+.2f} dB "
                   f"(target >= +4): {verdict(best.psnr - fora.psnr >= 4.0)}")
    per_solver = {}
    for name in pool_names:
        candidates = [single[k] for k in single if k[0] == name and k[1] in ("step", "sigma") and k[2] == n]
        if candidates:
            per_solver[name] = max(candidates, key=lambda r: r.psnr if math.isfinite(r.psnr) else -1e9)
    if len(per_solver) == len(pool_names):
        best_single = max(per_solver.values(), key=lambda r: r.psnr if math.isfinite(r.psnr) else -1e9)
        beaten = [k for k, v in per_solver.items() if not best.psnr > v.psnr]
        out.append(f"{tag} N={n}: HyCa best vs every single pool solver ({len(per_solver)} solvers, "
                   f"better time variable each; best single {best_single.name} {best_single.psnr:.2f} dB): "
                   f"margin {best.psnr - best_single.psnr:+.2f} dB: {verdict(not beaten)}"
                   + ("" if not beaten else " (not beaten by HyCa: " + ", ".join(beaten) + ")"))
    else:
        out.append(f"{tag} N={n}: HyCa vs every single pool solver: the ablation ran at the trained size of "
                   "the whole benchmark only")
    out += cache_targets(section, tag)
    out += fewer_steps_targets(section, tag, intervals)
    return out


def cache_targets(section: Section, tag: str) -> list[str]:
    """HyCa's curve against EasyCache / LazyCache at matched compute speed-ups."""
    frontier = hyca_frontier(list(section.hyca.values()))
    out = []
    for label in CACHE_FAMILIES:
        points = section.family(label)
        if not points:
            out.append(f"{tag} HyCa curve above {label}: not run at this size")
            continue
        checks, fails, skipped = [], 0, []
        for r in points:
            if r.compute_x <= 1.0 + 1e-9:
                skipped.append(f"thr {r.name.split('=')[-1]}: no step skipped")
                continue
            if not math.isfinite(r.psnr):
                checks.append(f"{r.compute_x:.2f}x: {label} broke (non-finite), HyCa wins")
                continue
            h, how = frontier_at(frontier, r.compute_x)
            if h is None:
                skipped.append(f"{r.compute_x:.2f}x ({r.psnr:.2f} dB): {how}")
                continue
            fails += not h > r.psnr
            checks.append(f"{r.compute_x:.2f}x: HyCa {h:.2f} vs {r.psnr:.2f} dB ({h - r.psnr:+.2f})")
        status = verdict(not fails) if checks else "NOT TESTED (no comparable point)"
        out.append(f"{tag} HyCa curve above {label} at every matched speed-up: {status}; " + "; ".join(checks)
                   + ("" if not skipped else " | not compared: " + "; ".join(skipped)))
    return out


def fewer_steps_targets(section: Section, tag: str, intervals) -> list[str]:
    """HyCa against fewer steps at equal block compute (the target) and at equal measured time."""
    out = []
    for samplers, what in ((("euler",), "euler"),
                           (("dpmpp_2m", "res_multistep"), "best of dpmpp_2m/res_multistep")):
        parts, ok = [], True
        for n in intervals:
            h = best_at(section.hyca, n)
            f = max((section.at(f"fewer steps {s}", n) for s in samplers), key=lambda r: r.psnr)
            margin = h.psnr - f.psnr
            ok &= margin >= 1.0
            parts.append(f"N={n} ({f.steps} steps): HyCa {h.psnr:.2f} vs {f.name.split()[0]} {f.psnr:.2f} "
                         f"({margin:+.2f}{'' if margin >= 1.0 else ' LOSES' if margin < 0 else ' <1dB'})")
        out.append(f"{tag} HyCa beats fewer steps ({what}) at equal block compute by >= 1 dB at every N: "
                   f"{verdict(ok)}; " + "; ".join(parts))
    for sampler in ("euler", "dpmpp_2m"):
        parts = []
        for n in intervals:
            h, f = section.at("equal time HyCa", n), section.at(f"equal time {sampler}", n)
            if h is None or f is None:
                continue
            margin = section.hyca["fixed", n].psnr - f.psnr
            parts.append(f"N={n}: HyCa fixed {h.seconds:.2f} s {section.hyca['fixed', n].psnr:.2f} dB "
                         f"vs {sampler} {f.steps} steps {f.seconds:.2f} s {f.psnr:.2f} dB ({margin:+.2f} dB, "
                         f"{'HyCa wins' if margin > 0 else 'HyCa LOSES'})")
        out.append(f"{tag} at equal measured time (the {sampler} step count whose time matches HyCa fixed's, "
                   "timed in the same rounds): " + "; ".join(parts))
    return out


def timing_check(section: Section) -> tuple[bool, str]:
    """Whether every timed speed-up stays within its Amdahl bound plus the measured noise."""
    timed = section.timed()
    over = [r for r in timed if r.timing_fails]
    worst = max(timed, key=lambda r: r.wall_x / r.bound)
    line = (f"[{section.size} px] timing check: every wall-clock speed-up within its Amdahl bound plus the "
            f"noise (full compute's (slowest - fastest) / median plus the method's, same rounds): "
            f"{verdict(not over)}; {len(timed)} timed methods, closest to the bound: {worst.name} "
            f"{worst.wall_x:.2f}x of {worst.bound:.2f}x (noise {worst.noise:.0%}); full compute's runs over "
            f"the section {section.full.seconds:.2f} s median, spread {section.full.spread:.0%}")
    if over:
        line += "; above it: " + "; ".join(f"{r.name} {r.wall_x:.2f}x > {r.bound:.2f}x (+{r.noise:.0%})"
                                           for r in over)
    return not over, line


def amdahl_lines(section: Section, intervals) -> str:
    parts = []
    for n in intervals:
        h = section.hyca["fixed", n]
        parts.append(f"N={n}: blocks {h.compute_x:.2f}x, wall {h.wall_x:.2f}x (bound {h.bound:.2f}x, "
                     f"{h.wall_x / h.bound:.0%} of it)")
    return (f"[{section.size} px] HyCa fixed: block-compute ratio, wall-clock speed-up and its Amdahl bound "
            f"({1 - section.share:.1%} of a full run outside the blocks): " + "; ".join(parts))


PREDICTED_STEP_TARGET = 0.10  # issue 17, on the reference models: a predicted step's share of a full one


def predicted_step_line(section: Section, intervals) -> str:
    """What a predicted step costs against a full one, from HyCa fixed's wall-clock speed-up: its run takes
    k + (S - k) p full steps' time for k computed steps of S, so p = (S / wall - k) / (S - k). The sampler's
    own work per step is in both; the figure carries the timing's noise (the +- columns)."""
    steps, parts, shares = section.full.steps, [], []
    for n in intervals:
        h = section.at("HyCa fixed", n)
        computed = steps / h.compute_x
        shares.append((steps / h.wall_x - computed) / (steps - computed))
        parts.append(f"N={n}: {shares[-1]:.1%}")
    holds = all(p <= PREDICTED_STEP_TARGET for p in shares)
    return (f"[{section.size} px] a predicted step's time as a share of a full step's (HyCa fixed, sampler "
            f"included; target <= {PREDICTED_STEP_TARGET:.0%}): {'HOLDS' if holds else 'FAILS'}; "
            + "; ".join(parts))


# ----------------------------------------------------------------------------------------------
# sampler matrix


@dataclass(frozen=True)
class MatrixRow:
    cfg: float
    size: int
    sampler: str
    n: int
    steps: int  # fewer steps at HyCa's compute
    hyca_blocks: int
    fewer_blocks: int
    hyca: float  # image PSNR against this sampler's 50-step full compute
    fewer: float  # this sampler at `steps`
    best: str  # the best stock sampler at `steps`
    best_psnr: float

    @property
    def margin(self) -> float:
        return self.hyca - max(self.fewer, self.best_psnr)


MATRIX_HEADER = (f"{'cfg':>4}{'px':>4} {'sampler':<14}{'N':>3}{'HyCa blocks':>12}{'HyCa dB':>9}{'steps':>6}"
                 f"{'blocks':>7}{'same sampler':>13}{'best stock sampler':>26}{'margin':>8}")


def matrix_row(r: MatrixRow) -> str:
    return (f"{r.cfg:>4g}{r.size:>4} {r.sampler:<14}{r.n:>3}{r.hyca_blocks:>12}{r.hyca:>9.2f}{r.steps:>6}"
            f"{r.fewer_blocks:>7}{r.fewer:>13.2f}{r.best:>16} {r.best_psnr:>9.2f}{r.margin:>+8.2f}")


def matrix_verdict(rows: list[MatrixRow]) -> str:
    losing = [r for r in rows if r.margin <= 0]
    return (f"HyCa under the user's sampler beats that sampler with fewer steps and the best stock sampler "
            f"at equal compute in every cell: {verdict(not losing)} "
            f"({len(rows) - len(losing)} of {len(rows)} cells)"
            + ("" if not losing else "; loses at " + ", ".join(
                f"cfg {r.cfg:g} {r.size} px {r.sampler} N={r.n} ({r.margin:+.2f} dB)" for r in losing)))


# ----------------------------------------------------------------------------------------------
# plot

FAMILY_STYLE = {
    "fewer steps euler": ("tab:gray", "s", "--"),
    "fewer steps dpmpp_2m": ("tab:brown", "s", "--"),
    "fewer steps res_multistep": ("tab:pink", "s", "--"),
    "equal time euler": ("tab:gray", "P", ""),
    "equal time dpmpp_2m": ("tab:brown", "P", ""),
    "FORA": ("tab:olive", "v", "-"),
    "Taylor": ("tab:cyan", "^", "-"),
    "TaylorSeer": ("tab:blue", "^", "-"),
    "EasyCache": ("tab:purple", "x", ":"),
    "EasyCache (input copied)": ("tab:purple", "D", ":"),
    "LazyCache": ("violet", "D", ":"),
    "HyCa fixed": ("tab:orange", "o", "-"),
    "HyCa fitted": ("tab:red", "o", "-"),
    "HyCa calibrated": ("tab:green", "o", "-"),
    "TaylorSeer calibrated": ("tab:blue", "^", ":"),
}


def plot(title: str, sections: list[Section], path: Path) -> None:
    """Per size: PSNR against the compute speed-up (counted block executions) and against the measured
    wall-clock speed-up, with HyCa fixed's Amdahl bounds on the second."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(sections), 2, figsize=(15, 6 * len(sections)), dpi=90, squeeze=False)
    for row_axes, section in zip(axes, sections):
        for ax, attr, xlabel in ((row_axes[0], "compute_x", "compute speed-up (counted block executions)"),
                                 (row_axes[1], "wall_x", "wall-clock speed-up (median of interleaved runs)")):
            for family, (color, marker, style) in FAMILY_STYLE.items():
                pts = [(getattr(r, attr), r.psnr)  # joined in order of compute
                       for r in sorted(section.family(family), key=lambda r: r.compute_x)
                       if math.isfinite(r.psnr) and math.isfinite(getattr(r, attr))]

                if pts:  # on the wall-clock panel, lines joined in order of compute show the timing noise
                    line = ax.plot(*zip(*pts), marker=marker, linestyle=style, color=color, label=family,
                                   markersize=8 if family.startswith("HyCa") else 6)[0]
                    line.set_alpha(1.0 if attr == "compute_x" else 0.6)
            ax.set(xlabel=xlabel, ylabel="image PSNR vs full compute (dB)", xscale="log",
                   title=f"{title}\n{section.size} px, {STEPS} steps euler/simple: quality against speed-up")
            ax.set_xticks([1, 1.5, 2, 3, 4, 5, 6, 8, 10])
            ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%gx"))
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.grid(True, which="both", alpha=0.3)
        bounds = sorted((r.bound, r.psnr) for r in section.family("HyCa fixed") if math.isfinite(r.psnr))
        if bounds:
            row_axes[1].plot(*zip(*bounds), linestyle="", marker="|", markersize=14, color="tab:orange",
                             label="HyCa fixed: Amdahl bound")
        for ax in row_axes:
            ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
