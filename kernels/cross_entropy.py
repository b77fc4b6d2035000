"""Linear + cross-entropy: loss = CE(x @ weight.T, targets)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def linear_cross_entropy_reference(
    x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100, reduction: str = "mean"
) -> torch.Tensor:
    logits = F.linear(x, weight).float()  # (N, V), materialised in full
    return F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction=reduction)
