"""Both families under torch.compile: their custom ops (fsa/compiled.py, nsa_baseline/ops/compiled.py)
pass torch.library.opcheck, and a fullgraph compile (aot_eager: tracing with the fake kernels, then
the real ones) gives the eager results, forward and backward, through o and lse, on one sequence and
on packed sequences."""
import pytest
import torch

import fsa
import nsa_baseline
from fsa import compiled as fsa_compiled
from nsa_baseline.ops import compiled as nsa_compiled
from nsa_baseline.utils.varlen import token_positions
from tests.ops.cases import CASES
from tests.ops.harness import check_all, reference

FAMILIES = {"nsa": nsa_baseline.selected_attention, "fsa": fsa.selected_attention}
family_param = pytest.mark.parametrize("family", FAMILIES.values(), ids=FAMILIES.keys())


def _op_args(family, x, q, k, v):
    scale = x.q.shape[-1] ** -0.5
    if family is fsa.selected_attention:
        return fsa_compiled.fsa_selected_fwd_op, (q, k, v, x.block_indices, x.cu_seqlens, x.block_size, scale)
    pos = token_positions(x.cu_seqlens, x.q.shape[0])[0].int()
    return nsa_compiled.nsa_selected_fwd_op, (q, k, v, x.block_indices, x.cu_seqlens, pos, x.block_size, scale)


@family_param
@pytest.mark.parametrize("case", [CASES[1], CASES[4]], ids=lambda c: c.id)
def test_custom_ops_pass_opcheck(family, case, device):
    x = case.make(torch.float32, device)
    q, k, v = (t.clone().requires_grad_() for t in x[:3])
    op, args = _op_args(family, x, q, k, v)
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


@family_param
@pytest.mark.parametrize("case", [CASES[3], CASES[4]], ids=lambda c: c.id)  # varlen, G = 5 / 8, holes, empty rows
def test_fullgraph_compile_matches_eager_and_reference(family, case, device):
    x = case.make(torch.float32, device)
    do, dlse = torch.randn_like(x.q), torch.randn(x.q.shape[1], x.q.shape[0], device=device)

    def loss(q, k, v):
        o, lse = family(q, k, v, x.block_indices, x.block_size, cu_seqlens=x.cu_seqlens, return_lse=True)
        return o, lse, (o * do).sum() + (torch.where(torch.isfinite(lse), lse, 0) * dlse).sum()

    torch._dynamo.reset()
    compiled_loss = torch.compile(loss, backend="aot_eager", fullgraph=True)
    outs = []
    for fn in (loss, compiled_loss):
        q, k, v = (t.clone().requires_grad_() for t in x[:3])
        o, lse, total = fn(q, k, v)
        outs.append((o.detach(), lse.detach(), *torch.autograd.grad(total, (q, k, v))))
    for name, a, b in zip(("o", "lse", "dq", "dk", "dv"), *outs):
        assert torch.equal(a, b), f"{name}: compiled differs from eager"
    ref = reference(x, do, torch.where(torch.isfinite(outs[0][1]), dlse, 0))
    check_all(outs[1], ref, torch.float32)


@pytest.mark.gpu
@family_param
def test_gpu_inductor_fullgraph_bf16(family):
    """The default backend (Inductor) on the GPU, bf16, 8K tokens, packed sequences: same results as
    eager up to bf16 rounding of the surrounding compiled ops."""
    from tests.helpers import assert_close
    from tests.ops.cases import realistic_case

    x = realistic_case(8192, 2, 3, 128, 16, 64, seqlens=[3000, 77, 5115])
    do = torch.randn_like(x.q)

    def loss(q, k, v):
        o = family(q, k, v, x.block_indices, x.block_size, cu_seqlens=x.cu_seqlens)
        return o, (o.float() * do.float()).sum()

    torch._dynamo.reset()
    outs = []
    for fn in (loss, torch.compile(loss, fullgraph=True)):
        q, k, v = (t.clone().requires_grad_() for t in x[:3])
        o, total = fn(q, k, v)
        outs.append((o.detach(), *torch.autograd.grad(total, (q, k, v))))
    for name, a, b in zip(("o", "dq", "dk", "dv"), *outs):
        assert_close(a, b, torch.bfloat16, name)


def test_auto_compiles_fullgraph_without_timing(device, monkeypatch):
    """fsa.auto under torch.compile picks without timing and traces through the chosen family's custom
    ops: the rule (FSA for G = 5) with no cached choice; on a GPU, where eager calls time and cache a
    choice (other tests may have timed this very configuration), the cached one (seeded here: NSA)."""
    from fsa import auto

    x = CASES[3].make(torch.float32, device)  # G = 5
    monkeypatch.setattr(auto, "_choices", {})
    key = auto.config_key(x.q, x.k, x.block_indices, x.block_size, x.cu_seqlens.numel() - 1, needs_grad=False)
    expected = [(None, fsa.selected_attention)]
    if x.q.is_cuda:  # eager calls on CPU follow the rule, no cached choice
        expected.append(("nsa", nsa_baseline.selected_attention))
    for cached, family in expected:
        if cached:
            auto._choices[key] = cached
        torch._dynamo.reset()  # the choice is fixed when the graph is traced
        fn = torch.compile(lambda q, k, v: auto.selected_attention(q, k, v, x.block_indices, x.block_size,
                                                                   cu_seqlens=x.cu_seqlens),
                           backend="aot_eager", fullgraph=True)
        assert torch.equal(fn(x.q, x.k, x.v), family(x.q, x.k, x.v, x.block_indices, x.block_size,
                                                     cu_seqlens=x.cu_seqlens))
