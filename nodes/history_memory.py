"""Whether the residual history fits in memory, decided before it is allocated, and what to fall back to.

Each cached residual's history takes all its slots at its first push, in a run's first computed call.
Before that allocation, its size (HyCa's own accounting: slots x residual x element size) is compared
with the memory ComfyUI reports free on the device, less what ComfyUI keeps for inference; a history
that would not fit is placed the way that costs least quality instead: on the offload device (slower,
same image), then in bf16 (a slightly less exact prediction), and if even that does not fit, the rest
of the run computes every step.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import torch

_HALF = torch.bfloat16


class Placement(NamedTuple):
    device: torch.device
    dtype: torch.dtype
    how: str  # what the fallback is, for the log; "" for the placement asked for


def history_bytes(slots: int, residual: torch.Tensor, dtype: torch.dtype) -> int:
    return slots * residual.numel() * torch.empty((), dtype=dtype).element_size()


def free_bytes(device: torch.device) -> int:
    """What ComfyUI's model management reports free on ``device``, less its reserve for inference."""
    import comfy.model_management as mm

    return int(mm.get_free_memory(device)) - int(mm.minimum_inference_memory())


class HistoryMemory:
    """Places each new history; ``budget`` (bytes per device) replaces the free memory when set."""

    def __init__(self, budget: int | None = None):
        self.budget = budget
        self.held: dict[torch.device, int] = {}  # bytes placed on each device in this run

    def _fits(self, nbytes: int, device: torch.device) -> bool:
        if self.budget is not None:
            return self.held.get(device, 0) + nbytes <= self.budget
        return nbytes <= free_bytes(device)

    def place(self, slots: int, residual: torch.Tensor, device: torch.device, dtype: torch.dtype,
              offload_device: torch.device | None) -> Placement | None:
        """Where a history of ``slots`` residuals like ``residual`` goes: as asked if it fits, else the
        first fallback that does; None if none does."""
        options = [Placement(device, dtype, "")]
        if offload_device is not None and offload_device != device:
            options.append(Placement(offload_device, dtype, f"kept on {offload_device}"))
        if torch.empty((), dtype=dtype).element_size() > 2:
            options += [Placement(p.device, _HALF, " and ".join(filter(None, (p.how, "stored in bf16"))))
                        for p in list(options)]
        for option in options:
            nbytes = history_bytes(slots, residual, option.dtype)
            if self._fits(nbytes, option.device):
                self.held[option.device] = self.held.get(option.device, 0) + nbytes
                return option
        return None


def log_fallback(placement: Placement | None) -> None:
    if placement is None:
        logging.warning("HyCa: the residual history does not fit in memory, even on the offload device in "
                        "bf16; this run computes every step from here (granularity \"stack\" holds far less)")
    else:
        logging.warning("HyCa: the residual history does not fit in free memory as set; it is %s instead "
                        "(granularity \"stack\" holds far less)", placement.how)
