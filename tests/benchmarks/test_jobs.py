"""Models benchmarked side by side: the child command lines, the longest-first order and the runner."""

import sys

from benchmarks.quality import jobs


def test_without_drops_the_options_and_their_values_in_both_spellings():
    argv = ["--quick", "--model", "wan", "--jobs=2", "--model=sd3", "--pairs", "4", "--jobs", "3"]
    assert jobs.without(argv, ("--model", "--jobs")) == ["--quick", "--pairs", "4"]


def test_last_seconds_reads_the_models_last_time_and_zero_without_a_file(tmp_path):
    results = tmp_path / "quality-sd3.txt"
    assert jobs.last_seconds(results) == 0.0
    results.write_text("table\ntotal benchmark time for sd3: 2239 s, 2077 s of this process's CPU time\n")
    assert jobs.last_seconds(results) == 2239.0


def test_run_all_runs_each_command_and_returns_its_exit_status(capfd):
    commands = {name: [sys.executable, "-c", f"print('hello from {name}'); raise SystemExit({code})"]
                for name, code in (("a", 0), ("b", 1), ("c", 0))}
    assert jobs.run_all(commands, jobs=2) == {"a": 0, "b": 1, "c": 0}
    out = capfd.readouterr().out.splitlines()
    assert sorted(out) == ["[a] hello from a", "[b] hello from b", "[c] hello from c"]
