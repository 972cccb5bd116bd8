"""Recording of per-block residual trajectories during a full-compute probe run.

A probe run observes every transformer block's residual (block output minus block input,
shape ``(batch, tokens, D)``) once per sampler step. Keeping all of it would cost tens of
gigabytes for a FLUX-size model, so the recorder keeps only a fixed, stratified sample of
tokens per block, moved to CPU in half precision as soon as it is seen.

Half precision keeps float16's 11-bit precision without its range (65504; real FLUX activations
exceed it): a step whose values would not fit is stored divided by a power of two, kept with the step.
Dividing by a power of two only changes the exponent, so values within 2^29 of the step's largest keep
all their precision (smaller ones fall to float16's subnormals, as they would unscaled).

Memory budget (see :meth:`TrajectoryRecorder.estimate_nbytes`): FLUX-size probing is
57 blocks x 50 steps x 3072 channels x 32 rows (default ``tokens=32``, batch 1) in float16:
57*50*3072*32*2 bytes of values + 57*50*16 bytes of times and scales = 560,378,400 bytes (about
0.56 GB). A batched cond/uncond pass (batch 2) doubles the rows and stays at about 1.12 GB, still
under the 2 GB budget.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

DEFAULT_TOKENS = 32

# Each recorded step also keeps its float64 ODE time and float64 scale.
_STEP_NBYTES = 16


def sample_token_indices(num_tokens: int, count: int, seed: int) -> torch.Tensor:
    """Sorted indices of ``count`` tokens out of ``num_tokens``, stratified and seeded.

    ``[0, num_tokens)`` is split into ``count`` contiguous strata of (nearly) equal size,
    stratum ``i`` being ``[floor(i*T/count), floor((i+1)*T/count))``, and one token is drawn
    uniformly from each. Tokens are laid out in raster order, so every image region is
    represented. The draw comes from a ``torch.Generator`` seeded with ``seed`` and
    ``num_tokens`` together, so a given (seed, token count) always yields the same indices
    and different resolutions get independent draws. All tokens are returned when
    ``num_tokens <= count``.
    """
    if num_tokens < 1 or count < 1:
        raise ValueError(f"need num_tokens >= 1 and count >= 1, got {num_tokens} and {count}")
    if num_tokens <= count:
        return torch.arange(num_tokens)
    # torch's CPU generator keeps only 32 bits of its seed, so both are mixed into 32 bits;
    # for one seed, distinct token counts always get distinct generator seeds.
    generator = torch.Generator().manual_seed((seed * 0x9E3779B1 + num_tokens) & 0xFFFFFFFF)
    starts = torch.arange(count) * num_tokens // count
    sizes = torch.arange(1, count + 1) * num_tokens // count - starts
    offsets = (torch.rand(count, generator=generator, dtype=torch.float64) * sizes).long()
    return starts + offsets


@dataclass
class Trajectory:
    """One block's recorded residuals."""

    sigmas: np.ndarray  # (S,) float64 ODE time of each recorded step, in recording order
    values: np.ndarray  # (S, R, D) float32: R sampled rows (batch x sampled tokens) per step


class _Track:
    """What the recorder keeps for one key."""

    def __init__(self, num_tokens: int, width: int, rows: int, indices: torch.Tensor):
        self.num_tokens = num_tokens
        self.width = width
        self.rows = rows
        self.indices = indices
        self.sigmas: list[float] = []
        self.steps: list[torch.Tensor] = []
        self.scales: list[float] = []  # a power of two per step: its values are steps[i] * scales[i]


class TrajectoryRecorder(Mapping):
    """Streams residuals into small CPU trajectories, one per key (usually one per block).

    As a read-only mapping from key to Trajectory it converts a block only when it is looked up,
    so a consumer going block by block holds one float32 copy at a time.
    """

    def __init__(self, tokens: int = DEFAULT_TOKENS, seed: int = 0,
                 dtype: torch.dtype = torch.float16):
        if tokens < 1:
            raise ValueError(f"tokens must be >= 1, got {tokens}")
        self.tokens = tokens
        self.seed = seed
        self.dtype = dtype
        self._tracks: dict[str, _Track] = {}
        self._shares: dict[tuple[str, float], dict[int, torch.Tensor]] = {}  # steps whose shares are coming

    def record(self, key: str, sigma: float, residual: torch.Tensor, share: tuple[int, int] = (0, 1)) -> None:
        """Keep the sampled tokens of ``residual`` (shape ``(..., T, D)``) at time ``sigma``.

        Leading dimensions are flattened into rows. The sampled rows are copied to CPU in
        the recorder's dtype right away, so later in-place changes to ``residual`` do not
        reach the recording. Each key must keep its token count, width and row count, and
        must not see the same sigma twice (samplers that call the model twice per step must
        be deduplicated by the caller). ``share`` (i, n): ``residual`` is the i-th of n shares of
        the step's rows (a batch the sampler split across model calls); the step is kept once
        all n have come, their rows in share order.
        """
        if residual.ndim < 2:
            raise ValueError(f"{key}: residual must be (..., tokens, channels), "
                             f"got shape {tuple(residual.shape)}")
        sigma = float(sigma)
        num_tokens, width = residual.shape[-2], residual.shape[-1]
        track = self._tracks.get(key)
        indices = sample_token_indices(num_tokens, self.tokens, self.seed) if track is None else track.indices
        # index_select copies, so the kept rows never alias the caller's tensor.
        sampled = residual.detach().index_select(-2, indices.to(residual.device)).reshape(-1, width)
        sampled = sampled.to("cpu", torch.float32)  # a few KB: scaled and rounded on the CPU
        index, count = share
        if count > 1:
            shares = self._shares.setdefault((key, sigma), {})
            shares[index] = sampled
            if len(shares) < count:
                return
            del self._shares[key, sigma]
            sampled = torch.cat([shares[i] for i in range(count)])
        rows = len(sampled)
        if track is None:
            track = self._tracks[key] = _Track(num_tokens, width, rows, indices)
        elif (num_tokens, width, rows) != (track.num_tokens, track.width, track.rows):
            raise ValueError(
                f"{key}: residual changed mid-run from {track.num_tokens} tokens x "
                f"{track.width} channels ({track.rows} rows) to {num_tokens} tokens x "
                f"{width} channels ({rows} rows); record each resolution/batch separately")
        if sigma in track.sigmas:
            raise ValueError(f"{key}: sigma {sigma!r} was already recorded; the caller must "
                             "record each step once")
        scale = _scale(float(sampled.abs().max()), self.dtype)
        track.steps.append((sampled / scale).to(self.dtype))
        track.scales.append(scale)
        track.sigmas.append(sigma)

    def __iter__(self):
        """Recorded keys, in first-seen order."""
        return iter(self._tracks)

    def __len__(self) -> int:
        return len(self._tracks)

    def __getitem__(self, key: str) -> Trajectory:
        return self.trajectory(key)

    def trajectory(self, key: str) -> Trajectory:
        """One key's recording as float arrays (a float32 copy: twice ``dtype=float16`` size)."""
        track = self._tracks[key]
        values = torch.stack(track.steps).float()
        values *= torch.tensor(track.scales, dtype=torch.float32)[:, None, None]
        return Trajectory(sigmas=np.asarray(track.sigmas, dtype=np.float64), values=values.numpy())

    def trajectories(self) -> dict[str, Trajectory]:
        """All recordings; use :meth:`trajectory` per key to keep peak memory low."""
        return {key: self.trajectory(key) for key in self._tracks}

    @property
    def nbytes(self) -> int:
        """Bytes held: recorded values plus a float64 time and scale per recorded step."""
        return sum(step.numel() * step.element_size() + _STEP_NBYTES
                   for track in self._tracks.values() for step in track.steps)

    @staticmethod
    def estimate_nbytes(blocks: int, steps: int, channels: int, rows: int,
                        dtype: torch.dtype = torch.float16) -> int:
        """Bytes :attr:`nbytes` will report after recording ``blocks`` keys for ``steps`` steps.

        ``rows`` is batch x sampled tokens. For FLUX (57 blocks, 50 steps, 3072 channels,
        batch 1, default 32 tokens, float16) this is 560,378,400 bytes, about 0.56 GB.
        """
        item = torch.empty((), dtype=dtype).element_size()
        return blocks * steps * (channels * rows * item + _STEP_NBYTES)


def _scale(largest: float, dtype: torch.dtype) -> float:
    """The power of two that brings ``largest`` within half of ``dtype``'s range (1.0 if it is there or
    is not finite: NaN and inf are kept, for calibration to refuse)."""
    limit = torch.finfo(dtype).max / 2
    if not math.isfinite(largest) or largest <= limit:
        return 1.0
    return 2.0 ** math.ceil(math.log2(largest / limit))
