"""ops/compression_inplace.py (the linear compression's GEMMs reading x where it lies) and
compression_grad_kernel.add_linear_window_grad against the float64 reference (interpreter, fp32 and
fp16), and the module's fused backward with compression_grad.IN_PLACE_LINEAR on against off."""
import pytest
import torch

from nsa_baseline.ops import compression_grad
from nsa_baseline.ops.compression_grad_kernel import add_linear_block_grad, add_linear_window_grad
from nsa_baseline.ops.compression_inplace import compress_linear_dweight, compress_linear_fwd
from nsa_baseline.reference.compression import compress_kv as compress_kv_ref
from tests.helpers import assert_close, rel_err, sm90_resources

DTYPES = [torch.float32, torch.float16]
IDS = ["fp32", "fp16"]


def _inputs(n, h, d, ks, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, h, d, generator=gen).to(dtype)
    w = (torch.randn(ks * d, d, generator=gen) / ks).to(dtype)
    pos = (0.5 * torch.randn(ks, d, generator=gen)).to(dtype)
    return x, w, pos


def _first_blocks(cu, ks, stride):
    """Each summary's first stride-block for sequences starting on the stride grid."""
    out = []
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        out += [s // stride + i for i in range(max(0, (e - s - ks) // stride + 1))]
    return torch.tensor(out, dtype=torch.int64)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("cu", [None, [0, 40, 44, 100, 147]], ids=["one", "varlen"])
def test_forward_and_weight_grad_equal_the_reference(dtype, cu):
    """H = 3, D = 16 (one 16-wide tile), kernel 8 stride 4, 147 tokens (a partial last tile; the rows
    past the last summary are never read); varlen: sequences of 40, 4 (no summary), 56, 47 tokens
    starting on the stride grid. Outputs, and d weight / d pos_emb against float64 autograd."""
    ks, stride, h, d = 8, 4, 3, 16
    x, w, pos = _inputs(147, h, d, ks, dtype)
    cu_t = None if cu is None else torch.tensor(cu, dtype=torch.int32)
    xr, wr, pr = (t.double().requires_grad_() for t in (x, w, pos))
    ref, _ = compress_kv_ref(xr, cu_t, ks, stride, wr, pr)
    first = None if cu is None else _first_blocks(cu_t, ks, stride)
    out = compress_linear_fwd(x, w, pos, first, ref.shape[0], ks, stride)
    assert_close(out, ref.detach(), dtype, "x_cmp")
    dy = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    ref.backward(dy.double())
    bias_part = pos.double().flatten()[:, None] * dy.double().sum((0, 1))[None, :]  # pos_emb's share of dW
    dw = compress_linear_dweight(x, dy, first, ks, stride)
    assert dw.dtype == torch.float32
    assert_close(dw.double() + bias_part, wr.grad, dtype, "d weight")


def test_weight_grad_sums_several_splits():
    """Enough (summary, head) rows for several tiles per split and several splits (the interpreter
    launches 3 per key offset): every row counted once."""
    ks, stride, h, d = 4, 2, 5, 16
    x, _, _ = _inputs(301, h, d, ks, torch.float32, seed=3)
    n_cmp = (301 - ks) // stride + 1
    dy = torch.randn(n_cmp, h, d, generator=torch.Generator().manual_seed(4))
    rows = (torch.arange(n_cmp)[:, None] * stride + torch.arange(ks)).flatten()
    spans = x[rows].double().view(n_cmp, ks, h, d).transpose(1, 2).reshape(n_cmp * h, ks * d)
    want = spans.t() @ dy.double().reshape(-1, d)
    assert_close(compress_linear_dweight(x, dy, None, ks, stride), want, torch.float32, "d weight")


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_window_grad_equals_the_block_grad_of_the_shifted_dz(dtype):
    """add_linear_window_grad (dz made from dwin on the fly, a strided dwin as the single-sequence view
    of dx_cmp) adds exactly what add_linear_block_grad adds from the dz it replaces."""
    h, nb, stride, d, c = 3, 37, 4, 16, 2
    m = nb - c + 1
    gen = torch.Generator().manual_seed(2)
    dx_cmp = torch.randn(m, h, d, generator=gen).to(dtype)
    dwin = dx_cmp.transpose(0, 1)  # [H, M, D], strides (D, H * D, 1)
    w_cat = torch.randn(stride * d, c * d, generator=gen).to(dtype)
    dz = torch.zeros(h, nb, c, d, dtype=dtype)
    for k in range(c):
        dz[:, k: k + m, k] = dwin
    base = torch.randn(nb * stride + 5, h, d, generator=gen).to(dtype)
    want, got = base.clone(), base.clone()
    add_linear_block_grad(want, dz.view(h, nb, c * d), w_cat, stride)
    add_linear_window_grad(got, dwin, w_cat, stride, nb)
    assert_close(got, want, dtype, "dx", tol=1e-6 if dtype == torch.float32 else 1e-3)
    assert torch.equal(got[nb * stride:], base[nb * stride:])


def test_bad_arguments_raise():
    x = torch.randn(20, 2, 16)
    w, pos = torch.randn(8 * 16, 16), torch.randn(8, 16)
    with pytest.raises(ValueError, match="`x` must be a contiguous"):
        compress_linear_fwd(x.transpose(0, 1), w, pos, None, 1, 8, 4)
    with pytest.raises(ValueError, match="need 24 rows of `x`"):
        compress_linear_fwd(x, w, pos, None, 5, 8, 4)
    with pytest.raises(ValueError, match="`first` must be"):
        compress_linear_fwd(x, w, pos, torch.zeros(2, dtype=torch.int64), 3, 8, 4)
    with pytest.raises(ValueError, match="`dy` must be"):
        compress_linear_dweight(x, torch.randn(4, 2, 8), None, 8, 4)


def _small_module_and_input():
    """NativeSparseAttention (FSA, hidden 32, 4 / 2 heads, d = 16, linear compression 8 / 4 with weights
    moved off their mean-pool start) and x [96, 32], seeded."""
    from nsa_baseline.module import NativeSparseAttention

    torch.manual_seed(0)
    m = NativeSparseAttention(32, 4, 2, 16, backend="fsa", kernel_size=8, kernel_stride=4, block_size=16, topk=3,
                              window_size=16)
    with torch.no_grad():
        for p in (m.k_cmp_weight, m.v_cmp_weight, m.k_cmp_pos, m.v_cmp_pos):
            p.add_(0.1 * torch.randn_like(p))
    return m, torch.randn(96, 32)


@pytest.mark.parametrize("cu", [None, [0, 48, 52, 96]], ids=["one", "varlen"])
def test_module_equal_with_in_place_linear(monkeypatch, cu):
    """NativeSparseAttention (FSA, linear compression on the block path: one sequence, or sequences
    starting on the stride grid) gives the same output and gradients with IN_PLACE_LINEAR on as off,
    and the in-place kernels run."""
    m, x = _small_module_and_input()
    cu_t = None if cu is None else torch.tensor(cu, dtype=torch.int32)

    def run():
        m.zero_grad()
        xx = x.clone().requires_grad_()
        y = m(xx, cu_t)
        y.square().sum().backward()
        return [y.detach(), xx.grad] + [p.grad.clone() for p in (m.k_cmp_weight, m.v_cmp_weight, m.k_cmp_pos,
                                                                   m.v_cmp_pos, m.k_proj.weight)]

    monkeypatch.setattr(compression_grad, "IN_PLACE_LINEAR", False)
    base = run()
    monkeypatch.setattr(compression_grad, "IN_PLACE_LINEAR", True)
    calls = []
    for name in ("compress_linear_fwd", "compress_linear_dweight", "add_linear_window_grad"):
        real = getattr(compression_grad, name)
        monkeypatch.setattr(compression_grad, name, lambda *a, _r=real, _n=name: (calls.append(_n), _r(*a))[1])
    on = run()
    assert sorted(set(calls)) == ["add_linear_window_grad", "compress_linear_dweight", "compress_linear_fwd"]
    names = ("y", "x", "k_cmp_weight", "v_cmp_weight", "k_cmp_pos", "v_cmp_pos", "k_proj")
    for name, a, b in zip(names, on, base):
        if name == "k_cmp_pos":  # pos @ W shifts every summary key of a head alike, which the softmax
            # ignores: its gradient is 0 up to rounding, so compare it against v_cmp_pos's scale
            assert (a - b).norm() <= 2e-4 * base[5].norm(), name
            continue
        assert_close(a, b, torch.float32, name)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_gather_path_forward_equal_with_in_place_linear(monkeypatch, dtype):
    """Kernel 8 stride 3 (the gather path: no stride-blocks) over 4 packed sequences off any grid (one
    shorter than a summary): with IN_PLACE_LINEAR the forward kernel reads each summary's first row
    from the gather layout; x_cmp and the (unchanged) gather backward's gradients equal the path off."""
    ks, stride, h, d = 8, 3, 2, 16
    x, w, pos = _inputs(90, h, d, ks, dtype, seed=5)
    cu = torch.tensor([0, 31, 36, 61, 90], dtype=torch.int32)

    def run(flag):
        monkeypatch.setattr(compression_grad, "IN_PLACE_LINEAR", flag)
        x_cmp, cu_cmp, state = compression_grad.compress_kv_forward(x, cu, ks, stride, w, pos)
        dy = torch.randn(x_cmp.shape, generator=torch.Generator().manual_seed(6)).to(dtype)
        dx = torch.zeros_like(x)
        grads = compression_grad.compress_into_backward(dy, dx, x, cu, ks, stride, state, w, pos)
        return (x_cmp, cu_cmp, dx) + grads

    calls = []
    real = compression_grad.compress_linear_fwd
    monkeypatch.setattr(compression_grad, "compress_linear_fwd", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    on = run(True)
    assert calls, "the in-place kernel did not run"
    off = run(False)
    assert torch.equal(on[1], off[1])
    for name, a, b in zip(("x_cmp", "dx", "d weight", "d pos_emb"), on[:1] + on[2:], off[:1] + off[2:]):
        assert_close(a, b, dtype, name)


@pytest.mark.parametrize("cu", [None, [0, 40, 44, 100, 147], [0, 31, 36, 61, 90]], ids=["one", "grid", "gather"])
def test_compress_kv_autograd_through_the_in_place_kernels(monkeypatch, cu):
    """ops.compress_kv with IN_PLACE_LINEAR on runs InPlaceLinearCompress (the fused path's kernels) and
    matches the float64 reference in value and in the gradients of x, weight and pos_emb (fp32); the
    third layout (sequences off the stride grid) takes the gather path."""
    from nsa_baseline.ops.compression import compress_kv

    monkeypatch.setattr(compression_grad, "IN_PLACE_LINEAR", True)
    n = 147 if cu is None or cu[-1] == 147 else cu[-1]
    ks, st = 8, 4
    x, w, pos = _inputs(n, 2, 16, ks, torch.float32, seed=3)
    cu_t = None if cu is None else torch.tensor(cu, dtype=torch.int32)
    calls = []
    real = compression_grad.compress_into_backward
    monkeypatch.setattr(compression_grad, "compress_into_backward", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    leaves = [t.clone().requires_grad_() for t in (x, w, pos)]
    y, cu_cmp = compress_kv(leaves[0], cu_t, ks, st, leaves[1], leaves[2])
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(4))
    y.backward(dy)
    assert calls, "compress_kv did not run the in-place path's backward"
    refs = [t.double().requires_grad_() for t in (x, w, pos)]
    y_ref, cu_ref = compress_kv_ref(refs[0], cu_t, ks, st, refs[1], refs[2])
    y_ref.backward(dy.double())
    assert torch.equal(cu_cmp, cu_ref)
    assert_close(y, y_ref, torch.float32, "x_cmp")
    for name, a, b in zip(("dx", "d weight", "d pos_emb"), leaves, refs):
        assert_close(a.grad, b.grad, torch.float32, name)


def test_per_branch_module_path_compresses_as_the_fused_one(monkeypatch):
    """With IN_PLACE_LINEAR on, the module's per-branch path (fused_backward=False, compress_kv) and its
    fused path (compress_kv_forward) give the same summaries, so the same block choice and output."""
    monkeypatch.setattr(compression_grad, "IN_PLACE_LINEAR", True)
    m, x = _small_module_and_input()
    outs = {}
    for fused in (True, False):
        m.fused_backward = fused
        y, br = m(x, return_branches=True)
        outs[fused] = (y, br["compressed"], br["block_indices"])
    assert torch.equal(outs[True][2], outs[False][2])
    assert torch.equal(outs[True][1], outs[False][1]), "the compressed branch differs"
    assert rel_err(outs[True][0], outs[False][0]) <= 1e-5


@pytest.mark.parametrize("kernel", ["fwd", "dw", "window_grad"])
def test_kernels_compile_for_sm90_without_spills(kernel):
    """The interpreter does not type the kernels: compile each for sm_90 (Triton's ahead-of-time path,
    no GPU, in a subprocess without TRITON_INTERPRET) at the module's shape (D = 128, kernel 32,
    stride 16, bf16, the launch's tiles and warps) and read ptxas's spills."""
    call = {
        "fwd": "compile_sm90(I._compress_linear_fwd_kernel, 'bf16', dict(H=64, D=128, KS=32, STRIDE=16, HAS_FIRST=True,"
               " BLOCK_M=128, BLOCK_D=128, PREC='tf32'), 8, 3, scalars={'N_CMP': 'i32'}, int_ptrs={'first'},"
               " f32_ptrs={'bias'})",
        "dw": "compile_sm90(I._compress_linear_dw_kernel, 'bf16', dict(H=64, D=128, KS=32, STRIDE=16, HAS_FIRST=False,"
              " BLOCK_M=64, BLOCK_D=128, PREC='tf32', WHILE_LOOP=False), 8, 3, scalars={'M': 'i32', 'TILES': 'i32'},"
              " int_ptrs={'first'}, f32_ptrs={'part'})",
        "window_grad": "compile_sm90(G._add_block_grad_kernel, 'bf16', dict(H=64, D=128, CD=256, STRIDE=16, BLOCK_B=64,"
                       " BLOCK_D=128, BLOCK_CD=256, PREC='tf32', WINDOWS=True), 8, 1, scalars={'NB': 'i32',"
                       " 'M': 'i32', 'stride_wh': 'i32', 'stride_wm': 'i32'}, int_ptrs=set())",
    }[kernel]
    out = sm90_resources("from nsa_baseline.ops import compression_inplace as I, compression_grad_kernel as G",
                         f"print(resources({call}))")
    assert "spill(stack)     0 B" in out, out


@pytest.mark.gpu
@pytest.mark.parametrize("cu", [None, [0, 1024, 1040, 20000, 65536]], ids=["single", "varlen_grid"])
def test_gpu_in_place_bf16_64k(monkeypatch, cu):
    """bf16, 64K tokens x 8 KV heads, d = 128, 32/16 (the block path): compress_kv_forward +
    compress_into_backward with IN_PLACE_LINEAR on against the fp32 reference on the same values
    (x_cmp, the keys' gradient added into dx, d weight, d pos_emb; bf16 bound), the kernels running."""
    n, h, d, ks, st = 65536, 8, 128, 32, 16
    bf16 = torch.bfloat16
    monkeypatch.setattr(compression_grad, "IN_PLACE_LINEAR", True)
    cu = None if cu is None else torch.tensor(cu, dtype=torch.int32, device="cuda")
    x = torch.randn(n, h, d, device="cuda").to(bf16)
    w = (torch.randn(ks * d, d, device="cuda") / ks).to(bf16)
    pe = (torch.randn(ks, d, device="cuda") / 8).to(bf16)
    out, _, state = compression_grad.compress_kv_forward(x, cu, ks, st, w, pe)
    assert state.in_place and state.blocks is None
    dout = torch.randn(out.shape, device="cuda")
    base = (0.01 * torch.randn(n, h, d, device="cuda")).to(bf16)  # a share dx already holds (small: the bf16
    # rounding of the sum, seen through dx - base, stays well below the bound)
    dx = base.clone()
    dw, dpe = compression_grad.compress_into_backward(dout.to(bf16), dx, x, cu, ks, st, state, w, pe)
    ref_in = [t.float().requires_grad_() for t in (x, w, pe)]
    ref, _ = compress_kv_ref(ref_in[0], cu, ks, st, *ref_in[1:])
    ref_grads = torch.autograd.grad(ref, ref_in, dout)
    got = (out, (dx.float() - base.float()), dw, dpe)
    errs = {q: rel_err(a, b) for q, a, b in zip(("x_cmp", "dx", "dweight", "dpos_emb"), got, (ref,) + ref_grads)}
    assert all(e <= 2e-2 for e in errs.values()), errs
