"""Rotary position embedding (half-split form) with positions that restart at every sequence."""
from __future__ import annotations

from typing import Optional

import torch

from nsa_baseline.utils.varlen import token_positions


def rope_positions(num_tokens: int, cu_seqlens: Optional[torch.Tensor], device) -> torch.Tensor:
    """int64 [N]: position of every packed token inside its own sequence."""
    if cu_seqlens is None:
        return torch.arange(num_tokens, device=device)
    return token_positions(cu_seqlens.to(device), num_tokens)[0]


def apply_rope(x: torch.Tensor, positions: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    r"""Rotate pairs (x[..., i], x[..., i + D/2]) by angle position * theta ** (-2i / D).

    Args:
        x: [N, heads, D] with D even; positions: int [N].
    Returns:
        [N, heads, D] in x.dtype (angles computed in float64 for float64 x, else float32).
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] % 2:
        raise ValueError(f"argument `x` must be [N, heads, D] with D even, got {getattr(x, 'shape', x)!r}")
    if not isinstance(positions, torch.Tensor) or tuple(positions.shape) != (x.shape[0],):
        raise ValueError(f"argument `positions` must be [N={x.shape[0]}], got {getattr(positions, 'shape', positions)!r}")
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    half = x.shape[-1] // 2
    inv_freq = theta ** (-torch.arange(half, device=x.device, dtype=compute) / half)  # [D/2]
    angle = positions.to(compute)[:, None] * inv_freq  # [N, D/2]
    cos, sin = angle.cos()[:, None, :], angle.sin()[:, None, :]
    x1, x2 = x.to(compute)[..., :half], x.to(compute)[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)
