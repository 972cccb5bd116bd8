"""Whether the residual history fits in memory, decided before it is allocated, and what to fall back to.

Each cached residual's history takes all its slots at its first push, in a run's first computed calls.
Before each allocation, the history the run will then hold (HyCa's own accounting: slots x residual x
element size) is compared with the memory ComfyUI reports free on the device, less what ComfyUI keeps
for inference. If it would not fit, the whole run's history moves to the placement that costs least
quality and fits: the offload device (slower, the same image), then bf16 (a slightly less exact
prediction), then both; if none fits, the rest of the run computes every step.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import torch

from ..hyca_core.predict import ResidualHistory


class Placement(NamedTuple):
    device: torch.device
    dtype: torch.dtype


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def free_bytes(device: torch.device) -> int:
    """What ComfyUI's model management reports free on ``device``, less its reserve for inference."""
    import comfy.model_management as mm

    return int(mm.get_free_memory(device)) - int(mm.minimum_inference_memory())


class HistoryMemory:
    """The run's placement of its histories; ``budget`` (bytes) replaces the free memory when set."""

    def __init__(self, placement: Placement | None, spare_device: torch.device, budget: int | None = None):
        self.placement = placement  # None until the first history: the residuals' own device and dtype
        self.spare_device = spare_device
        self.budget = budget
        self.values = 0  # residual values (slots x elements) of the histories admitted so far

    def _fallbacks(self, current: Placement) -> list[Placement]:
        """``current`` and what may replace it, least quality cost first."""
        options = [current]
        if self.spare_device != current.device:
            options.append(Placement(self.spare_device, current.dtype))
        if _itemsize(current.dtype) > 2:
            options += [Placement(p.device, torch.bfloat16) for p in list(options)]
        return options

    def _fits(self, values: int, moving: int, option: Placement) -> bool:
        """Whether ``values`` in all fit in ``option``, ``moving`` of them being new there."""
        if self.budget is not None:
            return values * _itemsize(option.dtype) <= self.budget
        return moving * _itemsize(option.dtype) <= free_bytes(option.device)

    def admit(self, slots: int, residual: torch.Tensor, asked: Placement) -> Placement | None:
        """The placement of the run's histories once one of ``slots`` residuals like ``residual`` joins:
        the current one if it fits, else the first fallback that fits all of them; None if none does."""
        current = self.placement or asked
        values = self.values + slots * residual.numel()
        for option in self._fallbacks(current):
            moving = slots * residual.numel() if option == current else values
            if self._fits(values, moving, option):
                self.placement, self.values = option, values
                return option
        return None


def moved(history: ResidualHistory, placement: Placement) -> ResidualHistory:
    """The same residuals in a history of this placement (the old storage is freed with ``history``)."""
    copy = ResidualHistory(history.capacity, placement.dtype, placement.device)
    for residual in history.views():
        copy.push(residual)
    return copy


def log_fallback(placement: Placement | None, spare_device: torch.device) -> None:
    if placement is None:
        logging.warning("HyCa: the residual history does not fit in memory, even on %s in bf16; this run "
                        "computes every step from here (granularity \"stack\" holds far less)", spare_device)
    else:
        logging.warning("HyCa: the residual history does not fit in free memory; it is held on %s in %s "
                        "instead (granularity \"stack\" holds far less)", placement.device,
                        str(placement.dtype).removeprefix("torch."))
