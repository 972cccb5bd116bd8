"""What the benchmark measures of one method's output, outside the timed runs: block executions
and model passes (counted by hooks in an untimed run), image quality against full compute, the
classifier's agreement, HyCa's residual-history peak from its log; and the row a method gets."""

from __future__ import annotations

import contextlib
import logging
import re
from dataclasses import dataclass, field

import torch

from harness.metrics import image_psnr, ssim


class Counter:
    """Block executions and model passes of one run."""

    def __init__(self):
        self.blocks = 0
        self.passes = 0


@contextlib.contextmanager
def counting(entry: torch.nn.Module, blocks: list[torch.nn.Module]):
    """Forward hooks counting real executions for the runs inside the ``with``: of the blocks, and of
    the model's entry module (a pass that ran the model's own work; a cache that skips the whole model,
    as EasyCache does, skips it too). They are removed on leaving, so no timed run carries them."""
    counter = Counter()

    def block(*_):
        counter.blocks += 1

    def model_pass(*_):
        counter.passes += 1

    handles = [b.register_forward_hook(block) for b in blocks]
    handles.append(entry.register_forward_hook(model_pass))
    try:
        yield counter
    finally:
        for handle in handles:
            handle.remove()


class LogCapture(logging.Handler):
    """Keeps the HyCa/EasyCache/LazyCache log lines of the current run."""

    def __init__(self):
        super().__init__(level=logging.INFO)
        self.lines: list[str] = []

    def emit(self, record):
        message = record.getMessage()
        if message.startswith(("HyCa", "EasyCache", "LazyCache")):
            self.lines.append(message)

    @contextlib.contextmanager
    def listening(self):
        """Capture the lines logged inside the block (from a cleared list), the root logger's handlers and
        level restored after it: the benchmark shares its process with others (the tests)."""
        root = logging.getLogger()
        level = root.level
        self.lines.clear()
        root.addHandler(self)
        root.setLevel(min(level, logging.INFO) if level else logging.INFO)
        try:
            yield self.lines
        finally:
            root.removeHandler(self)
            root.setLevel(level)


def history_mb(lines: list[str]) -> float | None:
    """HyCa's residual-history peak in MB, as its own log line states it (None: no such line)."""
    found = [float(m.group(1)) for line in lines
             if (m := re.search(r"residual history held ([0-9.]+) MB at most", line))]
    return max(found) if found else None


@dataclass
class Result:
    """One method's row: counted in its untimed run, timed in the interleaved runs (seconds: their
    median; nan where not timed), scored against the full compute of the same setting."""

    name: str
    family: str
    steps: int
    blocks: int
    passes: int
    psnr: float  # image_psnr: per decoded image, peak 1, mean over the batch
    ssim: float
    agree: float
    memory: str  # MB, "0" (no cache) or "-" (not known)
    compute_x: float = 1.0  # full compute's block executions / this method's
    seconds: float = float("nan")
    spread: float = float("nan")  # (slowest - fastest) / median of the timed runs
    wall_x: float = float("nan")  # full compute's median time / this method's, in the same rounds
    bound: float = float("nan")  # Amdahl's bound on wall_x with free prediction
    noise: float = float("nan")  # the relative noise the timing check allows wall_x above bound
    note: str = ""
    n: int | None = None
    key: tuple = ()
    lines: list[str] = field(default_factory=list)

    @property
    def timing_fails(self) -> bool:
        return self.wall_x > self.bound * (1 + self.noise)


def score(images: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """(image PSNR, SSIM) of decoded images against the reference's; nan for non-finite outputs."""
    if not bool(torch.isfinite(images).all()):
        return float("nan"), float("nan")
    return image_psnr(images, reference), ssim(images, reference)
