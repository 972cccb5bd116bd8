"""The ``dit`` replacement patch HyCa puts on each transformer block.

During a model call it follows the call's `Decision` (model_wrappers.py decides it): it runs the real
block and keeps its unit's residual, or adds the predicted residual to the block input.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .families import STREAMS, Block
from .run_state import OPTIONS_KEY, Call, Decision, RunState, current_call


@dataclass(frozen=True)
class Unit:
    """What one cached residual spans: a single block (the paper), or a stack of consecutive blocks
    that is computed or skipped as a whole (one residual per stream instead of one per block)."""

    name: str  # "double_block.3" or "double_blocks"
    size: int  # blocks in it

    def key(self, stream: str) -> str:
        """Name of one residual stream of this unit in a solver map: ``"double_block.3.img"``."""
        return f"{self.name}.{stream}"


class BlockPatch:
    """Replacement for one transformer block: run it and cache its unit's residual, or predict it.

    ``inner``: a replacement patch another node put on this block before HyCa (an IPAdapter-style pack's):
    HyCa runs it as the block, so what it caches and predicts is the block as that node changed it.
    """

    def __init__(self, block: Block, unit: Unit, first: bool = True, last: bool = True,
                 inner: Callable | None = None):
        self.block = block
        self.unit = unit
        self.first = first  # the unit's input is this block's input
        self.last = last  # the unit's output is this block's output
        self.inner = inner

    def _run(self, args: dict, extra: dict) -> dict:
        return extra["original_block"](args) if self.inner is None else self.inner(args, extra)

    def __call__(self, args: dict, extra: dict) -> dict:
        options = args["transformer_options"]
        call = current_call(options)
        state: RunState | None = options.get(OPTIONS_KEY)
        if call is None or state is None:
            return self._run(args, extra)
        if call.predict and self.unit.name not in call.fallback:
            if not self.first:  # the unit's prediction was added at its first block
                return {s: args[s] for s in STREAMS if s in args}
            state.predicted += self.unit.size
            return {s: self._predicted(state, call, args[s], s) for s in STREAMS if s in args}
        if call.decision in (Decision.PREDICT, Decision.COMPUTE):
            # COMPUTE keeps nothing; a predicted unit whose prediction was not finite is computed, not cached
            # either: the history stays what the run map fitted its weights to
            state.computed += 1
            state.fallbacks += call.predict
            return self._run(args, extra)
        if self.first:
            # FLUX-family blocks add their residuals in place: keep the inputs before the block runs.
            call.unit_inputs = {s: args[s].clone() for s in STREAMS if isinstance(args.get(s), torch.Tensor)}
        out = self._run(args, extra)
        state.computed += 1
        if not self.last:
            return out
        for s, before in call.unit_inputs.items():
            if isinstance(out.get(s), torch.Tensor):
                state.store(call, self.unit.key(s), out[s], before)
        return out

    def _predicted(self, state: RunState, call: Call, x: torch.Tensor, stream: str) -> torch.Tensor | None:
        """The stream's input plus its predicted residual, its finiteness queued for `RunState.faults` once
        the run has had a fault (`RunState.checking`). A stream with no history is one the block does not
        output (Wan/LTX-Video get the text as "txt" but return only "img"; SD3's last joint block returns
        "txt" None): None, as computed."""
        key = self.unit.key(stream)
        if key not in call.parts[0].branch.histories:
            return None
        out = state.predicted_output(call, key, x)
        if state.checking:
            state.check(call, self.unit.name, out, x)
        return out
