"""Rotary position embedding, half-split layout (the one Hugging Face Llama uses).

With x1 = x[..., :D/2], x2 = x[..., D/2:] and angles theta_i * pos:
    y1 = x1 * cos - x2 * sin
    y2 = x2 * cos + x1 * sin
"""

from __future__ import annotations

import torch


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin in fp32 for integer positions of shape (B, T) -> each (B, T, head_dim // 2)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    angles = positions.to(torch.float32)[..., None] * inv_freq  # (B, T, D/2)
    return angles.cos(), angles.sin()


def rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, T, H, D); cos, sin (B or 1, T, D/2) fp32. Computed in fp32, returned in x's dtype."""
    d2 = x.shape[-1] // 2
    xf = x.float()
    x1, x2 = xf[..., :d2], xf[..., d2:]
    c, s = cos[:, :, None, :], sin[:, :, None, :]  # (B, T, 1, D/2): broadcast over heads
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)
