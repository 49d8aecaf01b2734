"""Shared checks for kernel tests: relative error with per-dtype tolerances, NaN never passes."""
from __future__ import annotations

import math

import torch

# ||out - ref|| / ||ref|| bounds. fp32: the interpreter's fp32 dot (GPU runs tf32-free fp32 dots too);
# fp16/bf16: the kernel rounds operands and partials to the input dtype, the reference does not.
REL_TOL = {torch.float64: 1e-10, torch.float32: 2e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    finite = torch.isfinite(ref)
    if not torch.equal(finite, torch.isfinite(out)) or not torch.equal(out[~finite], ref[~finite]):
        return math.inf  # NaN / inf where the reference has none (or the other way round)
    num = (out[finite] - ref[finite]).norm().item()
    den = ref[finite].norm().item()
    return num / den if den > 0 else num


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, name: str, tol: float | None = None):
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    assert not torch.isnan(out).any(), f"{name}: contains NaN (unwritten or invalid elements)"
    tol = REL_TOL[dtype] if tol is None else tol
    err = rel_err(out, ref)
    assert err <= tol, f"{name}: relative error {err:.3e} > tolerance {tol:.1e} ({dtype})"
    return err
