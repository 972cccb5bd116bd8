"""What HyCa's log says about a run, read back by tests and benchmarks."""

import re

_COUNTS = re.compile(r"(\d+) block calls computed, (\d+) predicted")


def block_counts(text: str) -> tuple[int, int] | None:
    """(block calls computed, predicted) of the last run in a log's text, None if it logged none (a run
    that predicted nothing logs no counts)."""
    found = _COUNTS.findall(text)
    return (int(found[-1][0]), int(found[-1][1])) if found else None
