"""Run a selected-attention implementation and the reference on the same inputs: (o, lse, dq, dk, dv)."""
from __future__ import annotations

import torch

from nsa_baseline.reference import selected_attention_ref
from tests.helpers import assert_close

OUTPUT_NAMES = ("o", "lse", "dq", "dk", "dv")


def run_selected(fn, x, do, dlse=None, ref_dtype=None, **kw):
    """Forward and backward of `fn` (a contract implementation) on case inputs x (tests.ops.cases.CaseInputs).
    With ref_dtype the inputs are first cast (for the reference: float64 on CPU, float32 on GPU)."""
    q, k, v = (t.detach().to(ref_dtype or t.dtype).clone().requires_grad_() for t in x[:3])
    o, lse = fn(q, k, v, x.block_indices, x.block_size, cu_seqlens=x.cu_seqlens, return_lse=True, **kw)
    outs, grads = [o], [do.to(o.dtype)]
    if dlse is not None:
        outs.append(lse)
        grads.append(dlse.to(lse.dtype))
    dq, dk, dv = torch.autograd.grad(outs, (q, k, v), grads)
    return o, lse, dq, dk, dv


def reference(x, do, dlse=None, ref_dtype=torch.float64):
    return run_selected(selected_attention_ref, x, do, dlse, ref_dtype=ref_dtype)


def check_all(out, ref, dtype, tol=None):
    for name, a, b in zip(OUTPUT_NAMES, out, ref):
        assert_close(a, b, dtype, name, tol=tol)


def check_empty_rows(o, lse, ref_lse):
    """Rows that see no key: lse = -inf exactly where the reference has it, and o = 0 there."""
    assert not torch.isnan(lse).any()
    seen_nothing = torch.isneginf(lse)  # [HQ, N]
    assert torch.equal(seen_nothing, torch.isneginf(ref_lse))
    assert (o.transpose(0, 1)[seen_nothing] == 0).all(), "a row that sees nothing must give o = 0"
