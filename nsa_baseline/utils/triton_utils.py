"""Small Triton helpers: interpreter detection and launch-size rounding."""
from __future__ import annotations

import os

import triton


def is_interpreter() -> bool:
    """True when Triton runs kernels through its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def next_pow2(x: int) -> int:
    return triton.next_power_of_2(max(int(x), 1))
