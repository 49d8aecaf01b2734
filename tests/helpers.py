"""Shared checks for kernel tests: relative error with per-dtype tolerances, NaN never passes."""
from __future__ import annotations

import math

import torch

# ||out - ref|| / ||ref|| bounds. fp32: the interpreter's fp32 dot (GPU runs tf32-free fp32 dots too);
# fp16/bf16: the kernel rounds operands and partials to the input dtype, the reference does not.
REL_TOL = {torch.float64: 1e-10, torch.float32: 2e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| over the elements where ref is finite (inf if the non-finite elements
    differ), in fp64, chunk by chunk: a 64K-token, 64-head output compared whole would need several
    fp64 copies of it (GPU tests share the card between processes)."""
    out, ref = out.reshape(-1), ref.reshape(-1)
    num = den = 0.
    for lo in range(0, ref.numel(), 1 << 26):
        o, r = out[lo:lo + (1 << 26)].double(), ref[lo:lo + (1 << 26)].double()
        finite = torch.isfinite(r)
        if not torch.equal(finite, torch.isfinite(o)) or not torch.equal(o[~finite], r[~finite]):
            return math.inf  # NaN / inf where the reference has none (or the other way round)
        diff = torch.where(finite, o - r, 0.)
        num += diff.square().sum().item()
        den += torch.where(finite, r, 0.).square().sum().item()
    num, den = math.sqrt(num), math.sqrt(den)
    return num / den if den > 0 else num


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, name: str, tol: float | None = None):
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    assert not torch.isnan(out).any(), f"{name}: contains NaN (unwritten or invalid elements)"
    tol = REL_TOL[dtype] if tol is None else tol
    err = rel_err(out, ref)
    assert err <= tol, f"{name}: relative error {err:.3e} > tolerance {tol:.1e} ({dtype})"
    return err


def sm90_resources(*lines: str) -> str:
    """stdout of `lines` run with `compile_sm90` and `resources` (experiments/compressed_aot_check.py)
    imported, in a subprocess without TRITON_INTERPRET: the interpreter does not type kernels, Triton's
    ahead-of-time path for sm_90 does (no GPU needed). Skips when this Triton has no ptxas; fails when
    the subprocess does."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import pytest
    import triton

    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists():
        pytest.skip("Triton's ptxas is not in this install")
    code = "\n".join(("from experiments.compressed_aot_check import compile_sm90, resources",) + lines)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    return run.stdout
