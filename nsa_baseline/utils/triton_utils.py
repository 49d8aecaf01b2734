"""Small Triton helpers: interpreter detection and launch-size rounding."""
from __future__ import annotations

import os

import triton


def is_interpreter() -> bool:
    """True when Triton runs kernels through its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


LOG2E = 1.4426950408889634  # exp(x) = exp2(x * LOG2E): the kernels keep base-2 softmax statistics


def next_pow2(x: int) -> int:
    return triton.next_power_of_2(max(int(x), 1))


POISON_ENV = "NSA_POISON_OUTPUTS"


def poison_enabled() -> bool:
    return os.environ.get(POISON_ENV, "0") not in ("", "0")


def new_output(shape, dtype, device):
    """torch.empty for kernel outputs; filled with NaN (or int min) when NSA_POISON_OUTPUTS=1 so that
    tests catch every element a kernel forgot to write."""
    import torch

    out = torch.empty(shape, dtype=dtype, device=device)
    if poison_enabled():
        out.fill_(float("nan") if out.is_floating_point() else torch.iinfo(dtype).min)
    return out
