"""The fused gated sum of the NSA branches (nsa_baseline.ops.gated_sum) against the eager expression.

CPU (interpreter, outputs poisoned by conftest): forward and the gradients of every input that requires
one against `gated_sum_ref` in float64, fp32 and fp16 (also mixed with fp32 gates), N = 37 x HQ = 3
rows (a partial last row tile), D = 48 (padded to 64), 128 and 1, strided inputs (slices, transposes,
D-strided rows), only some inputs requiring gradients, argument errors and the dispatch of
nsa_baseline.branches. GPU: bf16 at 64K tokens x 8 heads x D = 128 against the reference in fp32.
"""
import pytest
import torch

from nsa_baseline import branches
from nsa_baseline.backends import resolve_backend
from nsa_baseline.ops.gated_sum import MAX_HEAD_DIM, gated_sum
from nsa_baseline.reference.gating import gated_sum_ref
from tests.helpers import assert_close, rel_err

FP64 = torch.float64
NAMES = ("gates", "o_cmp", "o_slc", "o_win")


def _inputs(n, hq, d, dtype, gates_dtype=None, layout="contiguous", device="cpu"):
    """(gates, o_cmp, o_slc, o_win) of the given dtypes, laid out as `layout` says."""
    gates = torch.rand(n, hq, 3, device=device)
    outs = [torch.randn(n, hq, d, device=device) for _ in range(3)]
    if layout == "slice":  # row strides of a wider tensor: [N, HQ + 2, D + 5][:, 1:-1, 2:-3]
        outs = [torch.nn.functional.pad(o, (2, 3, 1, 1))[:, 1:-1, 2:-3] for o in outs]
        gates = torch.nn.functional.pad(gates, (1, 0))[..., 1:]  # gates stride [HQ * 4, 4, 1]
    elif layout == "transpose":  # head-major storage [HQ, N, D] / gates [3, HQ, N]
        outs = [o.transpose(0, 1).contiguous().transpose(0, 1) for o in outs]
        gates = gates.permute(2, 1, 0).contiguous().permute(2, 1, 0)
    elif layout == "d_strided":  # D with stride 2 (every other element of [N, HQ, 2D])
        outs = [torch.stack([o, torch.full_like(o, float("nan"))], -1).flatten(-2)[..., ::2] for o in outs]
    gates = gates.to(gates_dtype or dtype)
    return [gates] + [o.to(dtype) for o in outs]


def _check(ins, requires=(True, True, True, True), seed=1):
    """Forward and the gradients of the inputs in `requires` against the float64 reference."""
    ours = [t.detach().requires_grad_(r) for t, r in zip(ins, requires)]
    ref_in = [t.detach().to(FP64).requires_grad_(r) for t, r in zip(ins, requires)]
    o = gated_sum(*ours)
    ro = gated_sum_ref(*ref_in)
    eager_dtype = gated_sum_ref(*[t.detach() for t in ins]).dtype
    assert o.dtype == eager_dtype and o.is_contiguous()
    assert_close(o, ro, o.dtype, "o")
    if not any(requires):
        assert not o.requires_grad
        return
    gen = torch.Generator().manual_seed(seed)
    do = torch.randn(o.shape, generator=gen).to(o.device, o.dtype)
    wanted = [t for t in ours if t.requires_grad]
    grads = torch.autograd.grad(o, wanted, do)
    rgrads = torch.autograd.grad(ro, [t for t in ref_in if t.requires_grad], do.to(FP64))
    names = [name for name, r in zip(NAMES, requires) if r]
    for name, t, g, rg in zip(names, wanted, grads, rgrads):
        assert g.dtype == t.dtype, f"d{name}: dtype {g.dtype} != input's {t.dtype}"
        assert_close(g, rg, t.dtype, f"d{name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("n,hq,d", [(37, 3, 48), (37, 3, 128), (5, 1, 1)], ids=["d48", "d128", "d1"])
def test_matches_reference(n, hq, d, dtype):
    _check(_inputs(n, hq, d, dtype))


@pytest.mark.parametrize("dtype,gates_dtype", [(torch.float16, torch.float32), (torch.float32, torch.float16)],
                         ids=["fp16-fp32gates", "fp32-fp16gates"])
def test_mixed_dtypes_follow_type_promotion(dtype, gates_dtype):
    """fp16 branches with fp32 gates give fp32 (as the eager expression), gradients in each input's dtype."""
    ins = _inputs(37, 3, 48, dtype, gates_dtype)
    assert gated_sum(*ins).dtype == torch.float32
    _check(ins)


def test_mixed_branch_dtypes():
    ins = _inputs(37, 3, 48, torch.float32)
    ins[2] = ins[2].half()
    _check(ins)


@pytest.mark.parametrize("layout", ["slice", "transpose", "d_strided"])
def test_strided_inputs_need_no_copy(layout):
    ins = _inputs(37, 3, 48, torch.float32, layout=layout)
    assert not any(t.is_contiguous() for t in ins[1:])
    _check(ins)
    do = torch.randn(37, 3, 48).transpose(0, 1).contiguous().transpose(0, 1)  # strided upstream gradient
    ours = [t.detach().requires_grad_() for t in ins]
    ref = [t.detach().to(FP64).requires_grad_() for t in ins]
    for name, g, rg in zip(NAMES, torch.autograd.grad(gated_sum(*ours), ours, do),
                           torch.autograd.grad(gated_sum_ref(*ref), ref, do.to(FP64))):
        assert_close(g, rg, torch.float32, f"d{name}")


def test_expanded_upstream_gradient():
    """.sum() hands the backward a stride-0 do: read through its strides, never copied."""
    ins = [t.requires_grad_() for t in _inputs(37, 3, 48, torch.float32)]
    ref = [t.detach().to(FP64).requires_grad_() for t in ins]
    gated_sum(*ins).sum().backward()
    gated_sum_ref(*ref).sum().backward()
    for name, t, r in zip(NAMES, ins, ref):
        assert_close(t.grad, r.grad, torch.float32, f"d{name}")


@pytest.mark.parametrize("requires", [(True, False, False, False), (False, True, False, False),
                                      (False, True, False, True), (True, False, True, False),
                                      (False, False, False, False)],
                         ids=["gates", "o_cmp", "o_cmp+o_win", "gates+o_slc", "none"])
def test_only_some_inputs_require_grad(requires):
    _check(_inputs(37, 3, 48, torch.float32), requires)


def test_saves_only_what_the_backward_reads():
    gates, *outs = _inputs(7, 2, 16, torch.float32)
    o = gated_sum(gates.requires_grad_(), *outs)  # only d gates: the branch outputs, not the gates
    saved = o.grad_fn.saved_tensors
    assert saved[0] is None and all(s is not None for s in saved[1:])
    o = gated_sum(gates.detach(), *(t.requires_grad_() for t in outs))  # only d o_b: the gates
    saved = o.grad_fn.saved_tensors
    assert saved[0] is not None and all(s is None for s in saved[1:])


def test_empty_rows():
    ins = [t.requires_grad_() for t in _inputs(0, 3, 16, torch.float32)]
    o = gated_sum(*ins)
    assert o.shape == (0, 3, 16)
    grads = torch.autograd.grad(o, ins, torch.zeros_like(o))
    assert [tuple(g.shape) for g in grads] == [tuple(t.shape) for t in ins]


def test_bad_arguments_name_the_argument():
    gates, o_cmp, o_slc, o_win = _inputs(6, 2, 8, torch.float32)
    bad = [
        ((gates[:, :, :2], o_cmp, o_slc, o_win), "gates"),
        ((gates[:, :1], o_cmp, o_slc, o_win), "gates"),  # would broadcast in the eager expression
        ((gates, o_cmp[:, :, 0], o_slc, o_win), "o_cmp"),
        ((gates, o_cmp, o_slc[:5], o_win), "o_slc"),
        ((gates, o_cmp, o_slc, o_win[..., :7]), "o_win"),
        ((gates, o_cmp, o_slc, o_win.int()), "o_win"),
        ((gates > 0.5, o_cmp, o_slc, o_win), "gates"),
        ((gates, "o_cmp", o_slc, o_win), "o_cmp"),
    ]
    for fn in (gated_sum, gated_sum_ref, branches.gated_sum):
        for args, name in bad:
            with pytest.raises(ValueError, match=f"`{name}`"):
                fn(*args)
    # the kernels' own limits (the reference and the dispatcher take these)
    with pytest.raises(ValueError, match="`o_slc`.*float64"):
        gated_sum(gates, o_cmp, o_slc.double(), o_win)
    with pytest.raises(ValueError, match="`gates`.*float64"):
        gated_sum(gates.double(), o_cmp, o_slc, o_win)
    wide = torch.zeros(1, 1, MAX_HEAD_DIM + 1)
    with pytest.raises(ValueError, match="`o_cmp`.*head dim"):
        gated_sum(torch.zeros(1, 1, 3), wide, wide, wide)


def test_kernel_needs_cuda_or_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="`o_cmp`.*TRITON_INTERPRET=1"):
        gated_sum(*_inputs(4, 1, 8, torch.float32))


def test_dispatch_and_backend_table():
    fp32 = _inputs(9, 2, 16, torch.float32)
    out = branches.gated_sum(*[t.requires_grad_() for t in fp32])
    assert type(out.grad_fn).__name__ == "GatedSumFunctionBackward"
    for ins in (_inputs(9, 2, 16, FP64), _inputs(9, 2, 16, torch.bfloat16)):  # reference: float64, bf16 on CPU
        out = branches.gated_sum(*[t.requires_grad_() for t in ins])
        assert type(out.grad_fn).__name__ == "AddBackward0"
        assert torch.equal(out, gated_sum_ref(*ins))
    assert resolve_backend("torch").gated_sum is gated_sum_ref
    for name in ("nsa", "fsa"):
        backend = resolve_backend(name)
        assert backend.gated_sum is branches.gated_sum and "gated_sum" not in backend.fallbacks


# ---------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("gates_dtype", [torch.bfloat16, torch.float32], ids=["bf16gates", "fp32gates"])
def test_gpu_bf16_64k(gates_dtype):
    """bf16 branches at 64K tokens x 8 heads x D = 128 against the reference in fp32; the fused forward
    rounds once, so it is at least as close to fp32 as the eager bf16 expression."""
    ins = _inputs(65536, 8, 128, torch.bfloat16, gates_dtype, device="cuda")
    ours = [t.detach().requires_grad_() for t in ins]
    ref_in = [t.detach().float().requires_grad_() for t in ins]
    o, ro = gated_sum(*ours), gated_sum_ref(*ref_in)
    assert o.dtype == gated_sum_ref(*[t.detach() for t in ins]).dtype
    err = assert_close(o, ro, torch.bfloat16, "o")
    assert err <= rel_err(gated_sum_ref(*[t.detach() for t in ins]), ro) + 1e-6
    do = torch.randn(o.shape, device="cuda").to(o.dtype)
    for name, t, g, rg in zip(NAMES, ours, torch.autograd.grad(o, ours, do),
                              torch.autograd.grad(ro, ref_in, do.float())):
        assert g.dtype == t.dtype
        assert_close(g, rg, torch.bfloat16, f"d{name}")


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["contiguous", "slice", "transpose", "d_strided"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_gpu_odd_sizes_and_strides(dtype, layout):
    _check(_inputs(4099, 5, 48, dtype, layout=layout, device="cuda"))
    _check(_inputs(4099, 5, 48, dtype, layout=layout, device="cuda"), (True, False, True, False))


@pytest.mark.parametrize("layout", ["contiguous", "transpose"])
def test_backward_deltas_are_each_branchs_rowsum(layout):
    """gated_sum_bwd(deltas=True): float32 [3, HQ, N] with delta_b[h, t] = sum_D o_b[t, h] * do_b[t, h]
    (what each branch's softmax backward needs), in the same pass as the gradients, which stay as
    without it. N = 37 x HQ = 3 (a partial row tile), D = 48 (padded), strided branch outputs."""
    from nsa_baseline.ops.gated_sum import gated_sum_bwd

    gates, *outs = _inputs(37, 3, 48, torch.float32, layout=layout)
    do = torch.randn(37, 3, 48)
    need, dtypes = (True, True, True, True), (torch.float32,) * 4
    *grads, deltas = gated_sum_bwd(do, gates, tuple(outs), need, dtypes, deltas=True)
    assert deltas.shape == (3, 3, 37) and deltas.dtype == torch.float32
    for b in range(3):
        want = (outs[b].double() * grads[b + 1].double()).sum(-1).T  # [HQ, N]
        assert_close(deltas[b], want, torch.float32, f"delta of branch {b}")
    for g, g0 in zip(grads, gated_sum_bwd(do, gates, tuple(outs), need, dtypes)):
        assert torch.equal(g, g0)
