"""Models benchmarked side by side: each in a process of its own, so that a 2-core machine runs two
at once. Every process still times its methods interleaved with its own full compute, so what the
other process takes from the machine falls on both sides of each ratio alike."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def last_seconds(results: Path) -> float:
    """The model's time in its last results file (0 where there is none): the longest run starts
    first, so that the others fill the other processes beside it."""
    if not results.is_file():
        return 0.0
    found = re.search(r"^total benchmark time for \S+ (\d+) s", results.read_text(), flags=re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def without(argv: list[str], options: tuple[str, ...]) -> list[str]:
    """A command line less the given options and their values (the parser allows no abbreviation)."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in options:
            skip = True
        elif not arg.startswith(tuple(f"{option}=" for option in options)):
            kept.append(arg)
    return kept


def run_all(commands: dict[str, list[str]], jobs: int) -> dict[str, int]:
    """Runs each command (name -> argv), `jobs` at once in the dict's order, their output line by line
    on this process's stdout after the name; returns each exit status."""
    printing = threading.Lock()

    def run(name: str) -> int:
        with subprocess.Popen(commands[name], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, bufsize=1) as child:
            for line in child.stdout:
                with printing:
                    sys.stdout.write(f"[{name}] {line}")
                    sys.stdout.flush()
        return child.returncode

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        return dict(zip(commands, pool.map(run, commands)))
