"""Class-conditioned "prompts" for the reference models: one fixed, seeded row of Gaussian text
tokens (and, where the layout has a pooled vector, one pooled vector) per class, the last row the
unconditional / negative prompt, in ComfyUI's conditioning format."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ClassPrompts:
    num_classes: int
    tokens: int
    token_dim: int
    pooled_dim: int  # 0: the layout has no pooled vector
    seed: int

    @functools.cached_property
    def _tables(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        # tokens first, then pooled, from one generator: the shipped weights were trained on these rows
        generator = torch.Generator().manual_seed(self.seed)
        tokens = torch.randn(self.num_classes + 1, self.tokens, self.token_dim, generator=generator)
        if not self.pooled_dim:
            return tokens, None
        return tokens, torch.randn(self.num_classes + 1, self.pooled_dim, generator=generator)

    def rows(self, labels) -> torch.Tensor:
        """Table rows for class labels; label ``num_classes`` (or -1) is the negative prompt."""
        labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
        labels = torch.where(labels < 0, torch.full_like(labels, self.num_classes), labels)
        if (labels > self.num_classes).any():
            raise ValueError(f"class labels must be in [0, {self.num_classes})")
        return labels

    def tensors(self, labels) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(context, pooled or None) for class labels."""
        rows = self.rows(labels)
        tokens, pooled = self._tables
        return tokens[rows], None if pooled is None else pooled[rows]

    def conditioning(self, class_id) -> list:
        """ComfyUI conditioning for one class (int) or one class per batch item (sequence of ints)."""
        context, pooled = self.tensors(class_id)
        return [[context, {} if pooled is None else {"pooled_output": pooled}]]

    def unconditional(self, batch: int = 1) -> list:
        """The negative prompt."""
        return self.conditioning([self.num_classes] * batch)
