"""The module's fused backward (nsa_baseline.fused_attention, issue #14): module.attention as one
autograd Function whose backward sums the branches' gradients in shared dq / dk / dv buffers.

CPU (Triton interpreter, fp32 / fp16, small shapes): gradients of q, k, v, gates and the compression
weights equal the per-branch autograd path and the torch backend; the graph has one node for the
whole attention (so a revert to autograd adds fails); the kernels' accumulate modes add exactly what
their plain mode writes; compress_kv's hand-written backward equals autograd's. GPU (`-m gpu`): the
module at realistic bf16 sizes, fused against per-branch.
"""
import pytest
import torch

from nsa_baseline.module import NativeSparseAttention
from tests.helpers import rel_err

D = 16
SMALL = dict(kernel_size=8, kernel_stride=4, block_size=16, topk=2, init_blocks=1, local_blocks=1,
             window_size=12, projections=False)
CU = [0, 5, 22, 45]  # odd lengths; the first is shorter than kernel_size (no summary)
FUSED_TOL = {torch.float32: 1e-5, torch.float16: 5e-3}  # fused vs per-branch: same kernels, another sum order
TORCH_TOL = 2e-4  # fp32 kernels vs the torch backend (tests/helpers.py REL_TOL)


def make_module(backend, hq, h, compression, dtype=torch.float32, **kw):
    torch.manual_seed(0)
    m = NativeSparseAttention(32, hq, h, D, backend=backend, compression=compression, **{**SMALL, **kw})
    if compression == "linear":  # away from the mean-pooling init, so that the weights matter
        with torch.no_grad():
            for p in (m.k_cmp_weight, m.v_cmp_weight):
                p.add_(0.05 * torch.randn_like(p))
            for p in (m.k_cmp_pos, m.v_cmp_pos):
                p.add_(0.5 * torch.randn_like(p))
    return m.to(dtype)


def inputs(hq, h, dtype=torch.float32, n=CU[-1]):
    q, k, v = torch.randn(n, hq, D), torch.randn(n, h, D), torch.randn(n, h, D)
    return [t.to(dtype) for t in (q, k, v, torch.rand(n, hq, 3))], torch.tensor(CU, dtype=torch.int32)


def fwd_bwd(m, ins, cu, fused=True):
    """(o, then the gradients of q, k, v, gates and of every parameter) of one fwd+bwd."""
    m.fused_backward = fused
    leaves = [t.detach().clone().requires_grad_() for t in ins]
    for p in m.parameters():
        p.grad = None
    o = m.attention(*leaves, cu)
    o.backward(torch.randn(o.shape, generator=torch.Generator().manual_seed(1)).to(o.dtype))
    named = {"o": o.detach()}
    named.update({f"d{name}": t.grad for name, t in zip(("q", "k", "v", "gates"), leaves)})
    named.update({f"d{name}": p.grad for name, p in m.named_parameters()})
    return named


def check_grads(got, want, tol, what):
    # d k_cmp_pos sums the summaries' dK over all keys, which cancels (each softmax row's dS sums to 0):
    # rounding noise around 0, held to the scale of the other weight gradients (as in test_module.py)
    scale = max((w.norm().item() for name, w in want.items() if name.startswith("d") and "cmp" in name
                 and name != "dk_cmp_pos" and w is not None), default=1.0)
    for name, w in want.items():
        g = got[name]
        if w is None:  # a frozen parameter
            assert g is None, f"{what} {name}: a gradient where none is wanted"
            continue
        assert g is not None and not torch.isnan(g).any(), f"{what} {name}: missing or NaN"
        if name == "dk_cmp_pos":
            assert (g.double() - w.double()).norm().item() <= tol * scale, f"{what} {name}"
        else:
            err = rel_err(g, w)
            assert err <= tol, f"{what} {name}: relative error {err:.2e} > {tol:g}"


@pytest.mark.parametrize("backend", ["nsa", "fsa"])
@pytest.mark.parametrize("compression", ["mean", "linear"])
@pytest.mark.parametrize("hq,h", [(1, 1), (3, 1)], ids=["g1", "g3"])
def test_fused_equals_per_branch_and_torch_backend(backend, compression, hq, h):
    m = make_module(backend, hq, h, compression)
    ins, cu = inputs(hq, h)
    fused = fwd_bwd(m, ins, cu, fused=True)
    check_grads(fused, fwd_bwd(m, ins, cu, fused=False), FUSED_TOL[torch.float32], "fused vs per-branch")
    ref = make_module("torch", hq, h, compression)
    ref.load_state_dict(m.state_dict())
    check_grads(fused, fwd_bwd(ref, ins, cu), TORCH_TOL, "fused vs torch backend")


@pytest.mark.parametrize("backend", ["nsa", "fsa"])
def test_fused_fp16_equals_per_branch(backend):
    m = make_module(backend, 3, 1, "linear", dtype=torch.float16)
    ins, cu = inputs(3, 1, torch.float16)
    check_grads(fwd_bwd(m, ins, cu, fused=True), fwd_bwd(m, ins, cu, fused=False), FUSED_TOL[torch.float16],
                "fp16 fused vs per-branch")


@pytest.mark.parametrize("backend", ["nsa", "fsa"])
def test_no_sequence_reaches_kernel_size(backend):
    """No summary at all: the compressed branch adds nothing, the weights get no gradient (None, as
    the per-branch path)."""
    m = make_module(backend, 3, 1, "linear")
    q, k, v, gates = (t[:13] for t in inputs(3, 1)[0])
    cu = torch.tensor([0, 5, 7, 13], dtype=torch.int32)
    check_grads(fwd_bwd(m, [q, k, v, gates], cu), fwd_bwd(m, [q, k, v, gates], cu, fused=False),
                FUSED_TOL[torch.float32], "no summaries")


def test_frozen_compression_weights():
    """Compression weights that need no gradient: none computed, the inputs' gradients unchanged."""
    m = make_module("fsa", 3, 1, "linear")
    for p in m.parameters():
        p.requires_grad_(False)
    ins, cu = inputs(3, 1)
    fused = fwd_bwd(m, ins, cu, fused=True)
    assert all(fused[f"d{name}"] is None for name, _ in m.named_parameters())
    check_grads(fused, fwd_bwd(m, ins, cu, fused=False), FUSED_TOL[torch.float32], "frozen weights")


def _leaf_uses(root):
    """AccumulateGrad node -> how many graph edges lead to it (one per autograd add it would need)."""
    uses, seen, stack = {}, set(), [root]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for nxt, _ in node.next_functions:
            if nxt is not None and type(nxt).__name__ == "AccumulateGrad":
                uses[nxt.variable] = uses.get(nxt.variable, 0) + 1
            stack.append(nxt)
    return uses, seen


@pytest.mark.parametrize("backend", ["nsa", "fsa"])
def test_module_backward_is_one_node_with_no_gradient_adds(backend):
    """q, k, v, gates and the compression weights each reach autograd through one edge of ONE node:
    the branches' gradients are summed inside its backward, not by autograd adds (a per-branch graph
    has 3 edges into q, 3 into k and v: this fails if the module goes back to it)."""
    m = make_module(backend, 3, 1, "linear")
    (q, k, v, gates), cu = inputs(3, 1)
    leaves = [t.requires_grad_() for t in (q, k, v, gates)]
    o = m.attention(*leaves, cu)
    assert type(o.grad_fn).__name__ == "NSAAttentionFunctionBackward"
    uses, nodes = _leaf_uses(o.grad_fn)
    assert len(nodes) == 1 + len(uses), "nodes other than the fused Function and the leaves"
    for t in leaves + list(m.parameters()):
        assert uses.get(t) == 1, "a leaf reached by several edges (autograd would add)"
    m.fused_backward = False
    uses, _ = _leaf_uses(m.attention(*leaves, cu).grad_fn)
    assert uses[q] == 3 and uses[k] == 3  # what the fused path removes


def test_fsa_fused_backward_is_deterministic():
    m = make_module("fsa", 3, 1, "linear")
    ins, cu = inputs(3, 1)
    a, b = fwd_bwd(m, ins, cu), fwd_bwd(m, ins, cu)
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_return_branches_gradients_reach_the_inputs():
    """A loss on a branch output (return_branches) adds to that branch's upstream gradient."""
    m = make_module("fsa", 3, 1, "mean")
    ins, cu = inputs(3, 1)
    grads = []
    for fused in (True, False):
        m.fused_backward = fused
        leaves = [t.detach().clone().requires_grad_() for t in ins]
        o, br = m.attention(*leaves, cu, return_branches=True)
        (o.square().sum() + br["window"].sum() + br["compressed"].square().sum()).backward()
        grads.append([t.grad for t in leaves])
    for name, a, b in zip("qkvg", *grads):
        assert rel_err(a, b) <= 1e-5, name


# ---- the kernels' accumulate modes ------------------------------------------------------------------

def _accumulated(bwd, shapes, dtype=torch.float32):
    """(plain result, accumulate-mode result minus the buffers' prior values) of bwd(out, accumulate)."""
    plain = bwd(None, False)
    prior = [torch.randn(s).to(dtype) for s in shapes]
    out = bwd(tuple(p.clone() for p in prior), True)
    return plain, [o - p for o, p in zip(out, prior)]


def _check_accumulated(plain, added, names, tol=1e-6):
    for name, a, b in zip(names, added, plain):
        assert not torch.isnan(a).any() and rel_err(a, b) <= tol, name


def test_window_and_compressed_accumulate_modes():
    from nsa_baseline.ops import compressed_triton as ct
    from nsa_baseline.ops import window_triton as wt

    n, hq, h = 45, 3, 1
    (q, k, v, _), cu = inputs(hq, h)
    do = torch.randn(n, hq, D)
    tables = wt.token_tables(cu, n, q.device)
    cfgs = wt.launch_configs(D, q.dtype)
    o, lse = wt.window_fwd(q, k, v, tables, 12, D ** -0.5, cfgs.fwd)
    plain, added = _accumulated(lambda out, acc: wt.window_bwd(q, k, v, o, lse, do, None, tables, 12, D ** -0.5,
                                                               cfgs, out=out, accumulate=acc),
                                (q.shape, k.shape, v.shape))
    _check_accumulated(plain, added, ("window dq", "window dk", "window dv"))

    from nsa_baseline.ops.compression import compress_kv
    k_cmp, cu_cmp = compress_kv(k, cu, 8, 4)
    v_cmp, _ = compress_kv(v, cu, 8, 4)
    c, c_cmp, scale = ct.checked_compressed_args(q, k_cmp, v_cmp, cu, cu_cmp, 8, 4, None)
    meta = ct.varlen_meta(cu, cu_cmp, c, c_cmp, n, k_cmp.shape[0])
    o, lse = ct.compressed_fwd(q, k_cmp, v_cmp, meta, 8, 4, scale)
    plain, added = _accumulated(lambda out, acc: ct.compressed_bwd(q, k_cmp, v_cmp, o, lse, do, None, meta, 8, 4,
                                                                   scale, dq=None if out is None else out[0],
                                                                   accumulate=acc)[:1], (q.shape,))
    _check_accumulated(plain, added, ("compressed dq",))


@pytest.mark.parametrize("family", ["nsa", "fsa", "fsa-passes"])
def test_selected_accumulate_modes(family, monkeypatch):
    """Busy blocks (the sink block is chosen by every query) go through the reduce kernels, blocks no
    query chose through the zero / skip path: every store of both families adds in accumulate mode.
    fsa-passes: a buffer budget so small that FSA runs one query head per pass (fp32 dK/dV sums)."""
    if family == "fsa-passes":
        monkeypatch.setenv("FSA_BUFFER_BUDGET_GB", "1e-9")
        family = "fsa"
    from tests.ops.cases import Case
    from nsa_baseline.utils.block_index import build_block_index
    from nsa_baseline.utils.varlen import token_positions

    q, k, v, idx, bs, cu = Case("acc", (37, 30), 1, 3, 16, 2, 16, seed=11).make(torch.float32)
    scale, n = D ** -0.5, q.shape[0]
    do = torch.randn_like(q)
    shapes = (q.shape, k.shape, v.shape)
    if family == "fsa":
        from fsa.backward import fsa_selected_bwd
        from fsa.forward import fsa_selected_fwd

        index = build_block_index(idx, bs, cu, k.shape[1])
        o, lse = fsa_selected_fwd(q, k, v, index, bs, idx.shape[2], scale)
        bwd = lambda out, acc: fsa_selected_bwd(q, k, v, o, lse, do, index, bs, idx.shape[2], scale, out=out,
                                                accumulate=acc)
    else:
        from nsa_baseline.ops.selected_bwd import nsa_selected_bwd
        from nsa_baseline.ops.selected_fwd import nsa_selected_fwd

        pos = token_positions(cu, n)[0].int()
        o, lse = nsa_selected_fwd(q, k, v, idx, bs, scale, pos)
        bwd = lambda out, acc: nsa_selected_bwd(q, k, v, o, lse, do, idx, bs, scale, cu, pos, dkdv_chunk=16,
                                                out=out, accumulate=acc)
    plain, added = _accumulated(bwd, shapes)
    _check_accumulated(plain, added, (f"{family} dq", f"{family} dk", f"{family} dv"))


@pytest.mark.parametrize("linear", [False, True], ids=["mean", "linear"])
@pytest.mark.parametrize("cu", [None, [0, 70], [0, 3, 40, 70], [0, 5, 70]], ids=["one", "cu1", "unaligned", "short"])
@pytest.mark.parametrize("ks,st", [(8, 4), (6, 4)], ids=["blocks", "gather"])
def test_compress_backward_adds_autograds_gradient(linear, cu, ks, st):
    """nsa_baseline.ops.compression_grad against autograd through compress_kv (float64, exact up to
    rounding): block path (aligned and gathered blocks) and gather path."""
    from nsa_baseline.ops.compression import compress_kv
    from nsa_baseline.ops.compression_grad import compress_into_backward, compress_kv_forward

    n, h, d, f64 = 70, 3, 8, torch.float64
    x = torch.randn(n, h, d, dtype=f64, requires_grad=True)
    w = (torch.randn(ks * d, d, dtype=f64) / ks).requires_grad_() if linear else None
    p = torch.randn(ks, d, dtype=f64).requires_grad_() if linear else None
    cu = None if cu is None else torch.tensor(cu, dtype=torch.int32)
    y, cu_cmp = compress_kv(x, cu, ks, st, w, p)
    dy = torch.randn_like(y)
    want = torch.autograd.grad(y, [x] + ([w, p] if linear else []), dy)
    detached = [None if t is None else t.detach() for t in (w, p)]
    y2, cu_cmp2, state = compress_kv_forward(x.detach(), cu, ks, st, *detached)
    assert torch.equal(cu_cmp, cu_cmp2) and rel_err(y2, y) <= 1e-12
    prior = torch.randn(n, h, d, dtype=f64)
    dx = prior.clone()
    got = (dx,) + compress_into_backward(dy, dx, x.detach(), cu, ks, st, state, *detached)
    assert rel_err(got[0] - prior, want[0]) <= 1e-12
    for a, b in zip(got[1:len(want)], want[1:]):
        assert rel_err(a, b) <= 1e-12


# ---- GPU: realistic sizes, bf16 ------------------------------------------------------------------------

GPU_POINTS = [  # (N, G, cu_seqlens, backend, compression); 64 query heads, D = 128, the paper's sizes
    pytest.param(16384, 1, None, "fsa", "linear", id="16K-g1-fsa-linear"),  # the profiled point: block path
    pytest.param(8192, 4, [0, 3000, 3011, 3100, 8192], "fsa", "mean", id="8K-g4-varlen-fsa-mean"),  # gather path
    pytest.param(8192, 4, [0, 3000, 3011, 3100, 8192], "nsa", "linear", id="8K-g4-varlen-nsa-linear"),
    pytest.param(16384, 16, None, "nsa", "mean", id="16K-g16-nsa-mean"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("n,g,cu,backend,compression", GPU_POINTS)
def test_gpu_fused_equals_per_branch(n, g, cu, backend, compression):
    """module.attention fwd+bwd, fused against per-branch on the same inputs: same block choice, bf16
    gradients within 1e-2 (the sums' order and bf16 rounding of partial sums differ); the FSA backward
    bitwise reproducible."""
    hq, d = 64, 128
    torch.manual_seed(0)
    m = NativeSparseAttention(hq * d, hq, hq // g, d, backend=backend, compression=compression,
                              projections=False).cuda()
    if compression == "linear":
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.1 * p.abs().mean() * torch.randn_like(p))
    m = m.to(torch.bfloat16)
    ins = [torch.randn(n, hq, d), torch.randn(n, hq // g, d), torch.randn(n, hq // g, d), torch.rand(n, hq, 3)]
    ins = [t.to("cuda", torch.bfloat16) for t in ins]
    cu = None if cu is None else torch.tensor(cu, dtype=torch.int32, device="cuda")

    def run(fused):
        m.fused_backward = fused
        leaves = [t.clone().requires_grad_() for t in ins]
        for p in m.parameters():
            p.grad = None
        o, br = m.attention(*leaves, cu, return_branches=True)
        o.backward(torch.randn(o.shape, generator=torch.Generator("cuda").manual_seed(1), device="cuda",
                               dtype=o.dtype))
        grads = {f"d{name}": t.grad for name, t in zip(("q", "k", "v", "gates"), leaves)}
        grads.update({f"d{name}": p.grad for name, p in m.named_parameters()})
        return o, br["block_indices"], grads

    o, idx, fused = run(True)
    o_ref, idx_ref, ref = run(False)
    assert torch.equal(idx, idx_ref) and rel_err(o, o_ref) <= 1e-3
    try:
        check_grads(fused, ref, 1e-2, "fused vs per-branch (bf16)")
    finally:  # the numbers for every gradient, in the report
        print({name: f"{rel_err(fused[name], ref[name]):.2e}" for name in ref})
    if backend == "fsa":
        again = run(True)[2]
        assert all(torch.equal(again[name], fused[name]) for name in ("dq", "dk", "dv", "dgates"))
