"""The summary across models: for each model and N, HyCa's margin over its strongest rivals, read back
from each model's results file (so a run of one model refreshes the summary beside the others' latest
results), written as a table and a plot with a panel per model."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from . import report
from .measures import Result
from .methods import FEWER_STEP_SAMPLERS, STEPS, WARMUP

SINGLE = ("FORA", "Taylor", "TaylorSeer", "single solver")  # one pool solver on the every-N schedule
EQUAL_TIME = ("equal time euler", "equal time dpmpp_2m")


@dataclass(frozen=True)
class Margin:
    """HyCa's PSNR minus a rival's (dB), and which rival."""

    db: float
    rival: Result


@dataclass(frozen=True)
class Line:
    """One model and N: HyCa's result and its margins (None where the run did not measure that rival)."""

    model: str
    size: int
    cfg: float
    n: int
    hyca: Result  # HyCa fixed: Apply's defaults
    stock: Margin | None  # the best stock sampler with fewer steps at HyCa's block compute
    single: Margin | None  # the best single solver on the same schedule
    fora: Margin | None
    equal_time: Margin | None  # the best stock sampler at HyCa's measured time


def best(section: report.Section, families, n: int) -> Result | None:
    candidates = [section.at(family, n) for family in families]
    measured = [r for r in candidates if r is not None and math.isfinite(r.psnr)]
    return max(measured, key=lambda r: r.psnr, default=None)


def margin(hyca: Result, rival: Result | None) -> Margin | None:
    return None if rival is None else Margin(hyca.psnr - rival.psnr, rival)


def lines(model: str, section: report.Section) -> list[Line]:
    out = []
    for hyca in sorted(section.family("HyCa fixed"), key=lambda r: r.n):
        n = hyca.n
        out.append(Line(model, section.size, section.cfg, n, hyca,
                        margin(hyca, best(section, [f"fewer steps {s}" for s in FEWER_STEP_SAMPLERS], n)),
                        margin(hyca, best(section, SINGLE, n)), margin(hyca, section.at("FORA", n)),
                        margin(hyca, best(section, EQUAL_TIME, n))))
    return out


def sampler_steps(r: Result) -> str:
    return f"{r.name.split()[0]} {r.steps}"


def single_name(r: Result) -> str:
    """FORA, Taylor, TaylorSeer by name; a member of the ablation by its solver and time variable."""
    return r.family if r.family != "single solver" else r.name.split()[1]


COLUMNS = [("best stock sampler, equal compute", lambda row: row.stock, sampler_steps),
           ("best single solver", lambda row: row.single, single_name),
           ("FORA", lambda row: row.fora, None),
           ("best stock sampler, equal measured time", lambda row: row.equal_time, sampler_steps)]


def cell(m: Margin | None, label) -> str:
    return "-" if m is None else f"{m.db:+.2f}" + (f" ({label(m.rival)})" if label else "")


def table(rows: list[Line], sources: dict[str, str]) -> list[str]:
    out = [(f"HyCa's margin (dB of image PSNR against full compute; positive: HyCa closer to full compute) "
            f"over its rivals, per model and N. HyCa = Apply's defaults (fixed solvers, warm-up {WARMUP}), "
            f"{STEPS} steps euler/simple, at each model's main cfg and trained size; "
            "compute: its speed-up in block executions, wall: measured (median of interleaved runs) "
            "with its Amdahl bound. Stock "
            f"samplers: {', '.join(FEWER_STEP_SAMPLERS)} with fewer steps (the best of them; name and steps "
            "in brackets); "
            "equal measured time: euler and dpmpp_2m at the step count whose time matches HyCa's, timed in "
            "the same rounds ('-' where the run did not time it); single solvers: those the run measured at "
            "that N."), ""]
    cells = [[cell(get(r), label) for _, get, label in COLUMNS] for r in rows]
    widths = [max([len(title)] + [len(c[i]) for c in cells]) for i, (title, _, _) in enumerate(COLUMNS)]
    out.append(f"{'model':<6}{'px':>4}{'cfg':>4}{'N':>3}{'compute':>9}{'wall (bound)':>15}{'HyCa dB':>9}"
               + "".join(f"  {title:<{w}}" for (title, _, _), w in zip(COLUMNS, widths)))
    for r, row_cells in zip(rows, cells):
        wall = f"{r.hyca.wall_x:.2f}x ({r.hyca.bound:.2f}x)"
        out.append((f"{r.model:<6}{r.size:>4}{r.cfg:>4g}{r.n:>3}{r.hyca.compute_x:>8.2f}x{wall:>15}{r.hyca.psnr:>9.2f}"
                    + "".join(f"  {c:<{w}}" for c, w in zip(row_cells, widths))).rstrip())
    losses = [f"{r.model} N={r.n} vs {title} ({m.db:+.2f} dB)" for r in rows for title, get, _ in COLUMNS
              if (m := get(r)) is not None and m.db <= 0]
    out += ["", "HyCa loses (margin <= 0): " + ("; ".join(losses) if losses else "nowhere"), "", "sources:"]
    out += [f"  {model}: {source}" for model, source in sources.items()]
    return out


def plot(rows: list[Line], path: Path) -> None:
    """One panel per model: each margin against N, zero marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r.model for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(6.5 * len(models), 4.5), dpi=90, squeeze=False)
    for ax, model in zip(axes[0], models):
        mine = [r for r in rows if r.model == model]
        for title, get, _ in COLUMNS:
            pts = [(r.n, get(r).db) for r in mine if get(r) is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=f"over {title}")
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set(xlabel="N (HyCa's interval)", ylabel="HyCa's margin (dB)", xticks=[r.n for r in mine],
               title=f"{model}, {mine[0].size} px, cfg {mine[0].cfg:g}: HyCa (defaults) over its rivals")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write(results: dict[str, Path], stem: Path, note: str = "") -> None:
    """The summary of the models' results files (model -> path; missing ones are left out) to
    ``stem``.txt and .png, `note` (the whole run's time) last."""
    rows, sources = [], {}
    for model, path in results.items():
        if not path.is_file():
            continue
        text = path.read_text()
        sections = report.read_sections(text)
        if not sections:
            raise ValueError(f"{path}: no results table in it")
        rows += lines(model, sections[0])
        total = re.search(r"^total benchmark time for .*$", text, flags=re.MULTILINE)
        sources[model] = f"{path.name}" + (f" ({total.group(0)})" if total else "")
    if not rows:
        raise ValueError("no results file to summarize: " + ", ".join(str(p) for p in results.values()))
    stem.with_suffix(".txt").write_text("\n".join(table(rows, sources) + ([note] if note else [])) + "\n")
    plot(rows, stem.with_suffix(".png"))
