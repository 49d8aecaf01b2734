"""Comparing a swapped model's parameter gradients with a float64 copy's, parameter by parameter."""
from __future__ import annotations

import torch

from tests.helpers import assert_close


def assert_grads_close(model, ref_model, tol: float) -> None:
    """Every parameter gradient of `model` within `tol` (relative) of `ref_model`'s, by name. The
    k_cmp_pos gradients are exact cancellations (each compressed softmax row's dS sums to zero):
    rounding noise around 0 in both, so they are held to the scale of the other gradients."""
    ref = dict(ref_model.named_parameters())
    grads = {name: (p.grad, ref[name].grad) for name, p in model.named_parameters()}
    assert all(g is not None and r is not None for g, r in grads.values()), \
        [name for name, (g, r) in grads.items() if g is None or r is None]
    scale = max(r.norm().item() for name, (_, r) in grads.items() if not name.endswith("k_cmp_pos"))
    for name, (g, r) in grads.items():
        if name.endswith("k_cmp_pos"):
            assert not torch.isnan(g).any() and (g.double() - r).norm().item() <= tol * scale, name
        else:
            assert_close(g, r, torch.float32, f"d {name}", tol=tol)
