"""The summary across models reads each model's table back from its results file (no ComfyUI needed)."""

import math

import pytest

from benchmarks.quality import report, summary
from benchmarks.quality.measures import Result


def result(name, family, psnr, n=None, steps=50, blocks=60, seconds=1.5, wall_x=3.0, bound=3.5, note=""):
    return Result(name, family, steps, blocks, 0, psnr, 0.99, 0.9375, "6.4", compute_x=300 / blocks,
                  seconds=seconds, spread=0.12, wall_x=wall_x, bound=bound, noise=0.2, note=note, n=n)


def section():
    full = result("full compute 50 steps", "full", math.inf, blocks=300, wall_x=1.0, bound=1.0,
                  note="classifier reads the asked class in 95%")
    s = report.Section(32, 16, 0.875, cfg=4.0, full=full)
    s.add([result("HyCa fixed N=6", "HyCa fixed", 41.06, n=6),
           result("HyCa fixed N=8", "HyCa fixed", 35.5, n=8, blocks=48),
           result("FORA (reuse/step) N=6", "FORA", 27.47, n=6),
           result("Taylor (taylor1/step) N=6", "Taylor", 38.04, n=6),
           result("TaylorSeer on HyCa's calibrated schedule, N=6 budget", "TaylorSeer calibrated", 39.9, n=6),
           result("only taylor1/sigma N=6 (warm-up 4)", "single solver", 38.5, n=6),
           result("euler 10 steps (= HyCa N=6)", "fewer steps euler", 34.29, n=6, steps=10, seconds=math.nan,
                  wall_x=12.5, bound=5.0),  # a speed-up far above its bound and a time not measured
           result("dpmpp_2m 10 steps (= HyCa N=6)", "fewer steps dpmpp_2m", 36.2, n=6, steps=10),
           result("dpmpp_2m 8 steps (= HyCa N=8)", "fewer steps dpmpp_2m", 36.0, n=8, steps=8, blocks=48),
           result("euler 16 steps (HyCa N=6's time)", "equal time euler", 42.0, n=6, steps=16),
           result("LazyCache thr=0.2", "LazyCache", 25.69, note="skipped 31/50 steps (2.63x speedup).")])
    s.eight = [result("8 steps: HyCa fixed N=2", "8-step", 34.16, n=2, steps=8)]
    return s


def test_a_table_reads_back_as_the_results_it_printed():
    written = section()
    text = "header line\n\n" + "\n".join(written.table()) + "\n\n=== HyCa under each sampler ===\n 1 32 euler"
    [read] = report.read_sections(text)
    assert (read.size, read.batch, read.share, read.cfg) == (32, 16, pytest.approx(0.875), 4.0)
    pairs = zip([written.full, *written.results, *written.eight], [read.full, *read.results, *read.eight],
                strict=True)
    for before, after in pairs:
        fields = ("name", "family", "n", "steps", "blocks", "note", "memory")
        assert [getattr(after, f) for f in fields] == [getattr(before, f) for f in fields]
        for field in ("psnr", "compute_x", "seconds", "wall_x", "bound", "ssim", "agree", "spread"):
            # to the table's precision
            printed = pytest.approx(getattr(before, field), abs=0.006, nan_ok=True)
            assert getattr(after, field) == printed, field


def test_a_line_that_is_no_row_is_an_error():
    with pytest.raises(ValueError, match="not a benchmark table row"):
        report.parse_row("HyCa fixed N=6 crashed", "HyCa fixed")


def test_margins_over_the_best_rival_of_each_kind_at_each_n():
    six, eight = summary.lines("flux", section())
    assert (six.n, eight.n) == (6, 8)
    assert six.stock.rival.family == "fewer steps dpmpp_2m" and six.stock.db == pytest.approx(41.06 - 36.2)
    assert six.single.rival.family == "single solver" and six.single.db == pytest.approx(41.06 - 38.5)
    assert six.fora.db == pytest.approx(41.06 - 27.47)
    assert six.equal_time.db == pytest.approx(41.06 - 42.0)
    assert (eight.single, eight.fora, eight.equal_time) == (None, None, None)  # not measured at N=8


def test_the_summary_names_every_loss_and_every_unmeasured_cell(tmp_path):
    path = tmp_path / "quality-flux-quick.txt"
    total = "total benchmark time for flux: 300 s (load average 3.0)"
    path.write_text("\n".join(section().table()) + f"\n\n{total}\n")
    summary.write({"flux": path, "wan": tmp_path / "quality-wan-quick.txt"}, tmp_path / "summary-quick")
    text = (tmp_path / "summary-quick.txt").read_text()
    rows = [line.split() for line in text.splitlines() if line.startswith("flux")]
    assert [row[:4] for row in rows] == [["flux", "32", "4", "6"], ["flux", "32", "4", "8"]]
    assert rows[1][-6:] == ["-0.50", "(dpmpp_2m", "8)", "-", "-", "-"]  # only stock samplers ran at N=8
    assert "flux N=6 vs best stock sampler, equal measured time (-0.94 dB)" in text
    assert "flux N=8 vs best stock sampler, equal compute (-0.50 dB)" in text
    assert "wan" not in text.split("sources:")[1] and "load average 3.0" in text
    assert (tmp_path / "summary-quick.png").stat().st_size > 0


def test_no_results_file_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no results file"):
        summary.write({"flux": tmp_path / "quality-flux-quick.txt"}, tmp_path / "summary-quick")


def test_a_predicted_steps_share_comes_from_hycas_speed_up_and_computed_steps():
    """HyCa fixed at N=6 computes 10 of 50 steps (5.00x) and runs 3.0x faster: 50 / 3 = 16.67 full steps'
    time, 10 of them computed, so each of the 40 predicted ones costs (16.67 - 10) / 40 = 16.7%."""
    line = report.predicted_step_line(section(), (6, 8))
    assert line.endswith("target <= 10%): FAILS; N=6: 16.7%; N=8: 20.6%")
