"""ops/compressed_sdpa.py: compressed attention of one sequence as causal attention over residues
(stride query heads per KV head) through PyTorch's fused kernels (CPU: its flash kernel), against the
float64 reference, forward (o, lse) and backward; the module with fused_attention.COMPRESSED_SDPA_MIN_TOKENS
on against off; on the GPU (bf16) against the Triton kernels, cuDNN or flash."""
import pytest
import torch

from nsa_baseline import fused_attention
from nsa_baseline.ops.compressed_sdpa import (compressed_sdpa_bwd, compressed_sdpa_fwd, padding_waste, residue_layout,
                                              sdpa_sequences)
from nsa_baseline.reference.compressed import compressed_attention_ref
from tests.helpers import assert_close, rel_err

# (N, HQ, H, D, kernel_size, stride): NSA's 32/16 with a partial last residue row; G = 3; a stride
# that does not divide kernel_size (5 / 2) with G = 1; N = kernel_size (one summary); 8 / 4
SHAPES = [(203, 6, 2, 16, 32, 16), (96, 6, 2, 16, 8, 4), (50, 3, 3, 8, 5, 2), (32, 4, 2, 16, 32, 16),
          (77, 4, 1, 16, 8, 4)]


def _case(n, hq, h, d, ks, st, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    n_cmp = (n - ks) // st + 1
    q = torch.randn(n, hq, d, generator=gen).to(dtype)
    k, v = (torch.randn(n_cmp, h, d, generator=gen).to(dtype) for _ in range(2))
    return q, k, v


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "n{}_hq{}_h{}_ks{}_st{}".format(s[0], s[1], s[2], s[4], s[5]))
def test_forward_and_backward_equal_the_reference(shape, dtype):
    n, hq, h, d, ks, st = shape
    q, k, v = _case(*shape, dtype)
    scale = d ** -0.5
    qr, kr, vr = (t.double().requires_grad_() for t in (q, k, v))
    o_ref, lse_ref = compressed_attention_ref(qr, kr, vr, None, None, ks, st, scale)
    seqs = sdpa_sequences(n, k.shape[0])
    o, lse, aux = compressed_sdpa_fwd(q, k, v, ks, st, scale, seqs)
    assert o.dtype == dtype and lse.dtype == torch.float32 and lse.shape == (hq, n)
    assert_close(o, o_ref.detach(), dtype, "o")
    assert torch.equal(torch.isinf(lse), torch.isinf(lse_ref))  # -inf exactly where no summary is visible
    assert torch.isinf(lse[:, : ks - 1]).all() and torch.equal(o[: ks - 1], torch.zeros_like(o[: ks - 1]))
    assert_close(lse, lse_ref.detach(), torch.float32, "lse")
    do = torch.randn(o.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    o_ref.backward(do.double())
    dq, dk, dv = compressed_sdpa_bwd(q, k, v, o, lse, do, aux, ks, st, scale, seqs)
    tol = 1e-6 if dtype == torch.float64 else None  # fp64: the lse is float32 (the module's contract)
    for name, got, want in (("dq", dq, qr.grad), ("dk", dk, kr.grad), ("dv", dv, vr.grad)):
        assert got.dtype == dtype and got.shape == want.shape
        assert_close(got, want, dtype, name, tol)
    base = torch.randn(q.shape, generator=torch.Generator().manual_seed(2)).to(dtype)
    acc, _, _ = compressed_sdpa_bwd(q, k, v, o, lse, do, aux, ks, st, scale, seqs, dq=base.clone(), accumulate=True)
    assert_close(acc, base.double() + qr.grad, dtype, "dq accumulated", tol)


@pytest.mark.parametrize("shape", SHAPES[:3])
def test_every_query_has_one_row(shape):
    """The residue layout maps every query that sees a summary to exactly one call row, and the call
    rows that are no query are the rest."""
    n, hq, h, d, ks, st = shape
    n_cmp = (n - ks) // st + 1
    lay = residue_layout(n, hq, hq // h, ks, st, torch.device("cpu"), sdpa_sequences(n, n_cmp))
    assert (lay.batch, lay.heads) == (1, h * st * (hq // h))
    seen = torch.arange((ks - 1) * hq, n * hq)  # row t * HQ + hq of each query that sees a summary
    assert torch.equal(lay.unseen, torch.arange((ks - 1) * hq))
    rows = lay.scatter[seen].long()
    assert rows.unique().numel() == rows.numel()
    used = torch.zeros(lay.heads * lay.length, dtype=torch.bool)
    used[rows] = True
    assert torch.equal((~used).nonzero().squeeze(1), lay.empty)
    assert torch.equal(lay.gather[rows].long(), seen)
    assert bool(torch.isin(lay.scatter[lay.unseen].long(), lay.empty).all())  # unseen rows read an empty row


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_packed_sequences_equal_the_reference(dtype):
    """Four packed sequences (61, 20 with no summary of 32, 100, 47 tokens; kernel 32 stride 16, G = 2)
    through the public function: the batch is padded to the longest; o, lse and gradients as the
    float64 reference, and the sequence with no summary gets o = 0, lse = -inf, zero gradient."""
    from nsa_baseline.ops.compressed_sdpa import compressed_attention_sdpa
    from nsa_baseline.utils.compressed_varlen import compressed_cu_seqlens

    ks, st, hq, h, d = 32, 16, 4, 2, 16
    cu = torch.tensor([0, 61, 81, 181, 228], dtype=torch.int32)
    cu_cmp = compressed_cu_seqlens(cu, ks, st)
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(228, hq, d, generator=gen).to(dtype)
    k, v = (torch.randn(int(cu_cmp[-1]), h, d, generator=gen).to(dtype) for _ in range(2))
    ins = [t.clone().requires_grad_() for t in (q, k, v)]
    refs = [t.double().requires_grad_() for t in (q, k, v)]
    o, lse = compressed_attention_sdpa(*ins, cu, cu_cmp, ks, st)
    o_ref, lse_ref = compressed_attention_ref(*refs, cu, cu_cmp, ks, st)
    assert_close(o, o_ref.detach(), dtype, "o")
    assert torch.equal(torch.isinf(lse), torch.isinf(lse_ref)) and torch.isinf(lse[:, 61:81]).all()
    assert_close(lse, lse_ref.detach(), torch.float32, "lse")
    do = torch.randn(o.shape, generator=torch.Generator().manual_seed(4)).to(dtype)
    o.backward(do)
    o_ref.backward(do.double())
    tol = 1e-6 if dtype == torch.float64 else None
    for name, a, b in zip(("dq", "dk", "dv"), ins, refs):
        assert_close(a.grad, b.grad, dtype, name, tol)
    assert not ins[0].grad[61:81].any()
    assert 0.3 < padding_waste(sdpa_sequences(228, k.shape[0], cu, cu_cmp, ks, st, max_waste=1.0), ks, st) < 0.8


@pytest.mark.parametrize("g", [1, 3])
def test_module_equal_with_the_sdpa_branch(monkeypatch, g):
    """NativeSparseAttention (FSA, 150 tokens: one sequence, then two of 70 and 80) gives the same
    output and gradients with the compressed branch on the fused SDPA kernels
    (COMPRESSED_SDPA_MIN_TOKENS = 0) as on the Triton kernels; a packed batch of 140 + 10 + 10 tokens
    (padding would waste two thirds of the work) keeps the Triton kernels."""
    from nsa_baseline.ops import compressed_sdpa
    from nsa_baseline.module import NativeSparseAttention

    torch.manual_seed(0)
    m = NativeSparseAttention(48, 2 * g, 2, 16, backend="fsa", kernel_size=8, kernel_stride=4, block_size=16,
                              topk=3, window_size=16)
    x = torch.randn(150, 48)

    def run(cu=None):
        m.zero_grad()
        xx = x.clone().requires_grad_()
        y = m(xx, cu)
        y.square().sum().backward()
        return [y.detach(), xx.grad] + [p.grad.clone() for p in (m.q_proj.weight, m.k_proj.weight, m.k_cmp_weight)]

    monkeypatch.setattr(fused_attention, "COMPRESSED_SDPA_MIN_TOKENS", None)
    base = run()
    monkeypatch.setattr(fused_attention, "COMPRESSED_SDPA_MIN_TOKENS", 0)
    calls = []
    real = compressed_sdpa.residue_layout
    monkeypatch.setattr(compressed_sdpa, "residue_layout", lambda *a: (calls.append(1), real(*a))[1])
    on = run()
    assert calls, "the SDPA path did not run"
    for name, a, b in zip(("y", "x", "q_proj", "k_proj", "k_cmp_weight"), on, base):
        assert_close(a, b, torch.float32, name)
    monkeypatch.setattr(fused_attention, "COMPRESSED_SDPA_MIN_TOKENS", None)
    cu = torch.tensor([0, 70, 150], dtype=torch.int32)
    base = run(cu)
    monkeypatch.setattr(fused_attention, "COMPRESSED_SDPA_MIN_TOKENS", 0)
    calls.clear()
    on = run(cu)
    assert calls, "a packed batch of like lengths did not take the SDPA path"
    for name, a, b in zip(("y", "x", "q_proj", "k_proj", "k_cmp_weight"), on, base):
        assert_close(a, b, torch.float32, f"{name} (packed)")
    calls.clear()
    x = torch.randn(160, 48)  # 140 + 10 + 10 tokens: the short ones have one summary each
    run(torch.tensor([0, 140, 150, 160], dtype=torch.int32))
    assert not calls, "a packed batch whose padding wastes most of the work took the SDPA path"


@pytest.mark.gpu
@pytest.mark.parametrize("g", [1, 4])
def test_gpu_sdpa_branch_equals_triton_bf16(g):
    """bf16, 16K tokens, 32 query heads, d = 128, 32/16: o, lse, dq, dk, dv against the Triton compressed
    kernels (both bf16 against each other: 2x the bf16 bound), through cuDNN where this build has it."""
    from nsa_baseline.ops.compressed_triton import compressed_bwd, compressed_fwd, varlen_meta

    n, hq, d, ks, st = 16384, 32, 128, 32, 16
    h = hq // g
    n_cmp = (n - ks) // st + 1
    bf16 = torch.bfloat16
    q = torch.randn(n, hq, d, device="cuda", dtype=bf16)
    k, v = (torch.randn(n_cmp, h, d, device="cuda", dtype=bf16) for _ in range(2))
    do = torch.randn(n, hq, d, device="cuda", dtype=bf16)
    scale = d ** -0.5
    cu = torch.tensor([0, n], dtype=torch.int32, device="cuda")
    meta = varlen_meta(None, None, cu, torch.tensor([0, n_cmp], dtype=torch.int32, device="cuda"), n, n_cmp)
    o_t, lse_t = compressed_fwd(q, k, v, meta, ks, st, scale)
    dq_t, dk_t, dv_t = compressed_bwd(q, k, v, o_t, lse_t, do, None, meta, ks, st, scale)
    seqs = sdpa_sequences(n, n_cmp)
    o, lse, aux = compressed_sdpa_fwd(q, k, v, ks, st, scale, seqs)
    dq, dk, dv = compressed_sdpa_bwd(q, k, v, o, lse, do, aux, ks, st, scale, seqs)
    from nsa_baseline.ops.compressed_sdpa import last_backend

    assert last_backend() in ("cudnn", "cudnn_repeat", "flash")
    finite = torch.isfinite(lse_t)
    assert torch.equal(finite, torch.isfinite(lse))
    assert (lse[finite] - lse_t[finite]).abs().max().item() < 2e-2
    errs = {name: rel_err(a, b) for name, a, b in (("o", o, o_t), ("dq", dq, dq_t), ("dk", dk, dk_t),
                                                  ("dv", dv, dv_t))}
    assert all(e <= 4e-2 for e in errs.values()), (last_backend(), errs)


def test_public_function_is_differentiable_and_checks_its_arguments():
    """compressed_attention_sdpa: autograd through o equals the reference's; wrong summary counts or
    head layouts are ValueErrors naming the argument."""
    from nsa_baseline.ops.compressed_sdpa import compressed_attention_sdpa

    q, k, v = _case(100, 4, 2, 16, 32, 16, torch.float64)
    ins = [t.clone().requires_grad_() for t in (q, k, v)]
    refs = [t.clone().requires_grad_() for t in (q, k, v)]
    o, lse = compressed_attention_sdpa(*ins, None, None, 32, 16)
    assert not lse.requires_grad
    o_ref, _ = compressed_attention_ref(*refs, None, None, 32, 16)
    do = torch.randn_like(o)
    o.backward(do)
    o_ref.backward(do)
    for name, a, b in zip(("dq", "dk", "dv"), ins, refs):
        assert_close(a.grad, b.grad, torch.float64, name, 1e-6)
    with pytest.raises(ValueError, match="k_cmp"):
        compressed_attention_sdpa(q, k[:3], v[:3], None, None, 32, 16)
    with pytest.raises(ValueError, match="q"):
        compressed_attention_sdpa(q[:, :3], k, v, None, None, 32, 16)


def test_repeated_summaries_layout_equals_the_shared_one(monkeypatch):
    """The cudnn_repeat layout (summaries repeated per query head, dK / dV summed back), run on the CPU
    flash kernel, gives what the shared (GQA) layout gives."""
    from nsa_baseline.ops import compressed_sdpa

    n, hq, h, d, ks, st = 96, 6, 2, 16, 8, 4
    q, k, v = _case(n, hq, h, d, ks, st, torch.float64, seed=7)
    seqs = sdpa_sequences(n, k.shape[0])
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(8), dtype=torch.float64)

    def run():
        o, lse, aux = compressed_sdpa_fwd(q, k, v, ks, st, d ** -0.5, seqs)
        return (o, lse) + compressed_sdpa_bwd(q, k, v, o, lse, do, aux, ks, st, d ** -0.5, seqs)

    shared = run()
    monkeypatch.setattr(compressed_sdpa, "CPU_BACKEND", "cpu_repeat")
    monkeypatch.setattr(compressed_sdpa, "_CHOSEN", {})  # the shape's first backend is remembered
    repeated = run()
    assert compressed_sdpa.last_backend() == "cpu_repeat"
    for name, a, b in zip(("o", "lse", "dq", "dk", "dv"), repeated, shared):
        assert_close(a, b, torch.float64, name, 1e-12)


@pytest.mark.parametrize("cu", [None, [0, 70, 150]], ids=["one", "packed"])
def test_per_branch_path_routes_the_compressed_branch_as_the_fused_one(monkeypatch, cu):
    """With COMPRESSED_SDPA_MIN_TOKENS = 0, branches.compressed_attention (the module's per-branch path,
    fused_backward=False) also runs the fused SDPA kernels: the compressed branch and the block choice
    equal the fused path's bit for bit, output and gradients to rounding; below the limit it keeps the
    Triton kernels."""
    from nsa_baseline import branches
    from nsa_baseline.ops import compressed_sdpa
    from nsa_baseline.module import NativeSparseAttention

    torch.manual_seed(0)
    m = NativeSparseAttention(48, 6, 2, 16, backend="fsa", kernel_size=8, kernel_stride=4, block_size=16,
                              topk=3, window_size=16)
    x = torch.randn(150, 48)
    cu_t = None if cu is None else torch.tensor(cu, dtype=torch.int32)
    calls = []
    real = compressed_sdpa.residue_layout
    monkeypatch.setattr(compressed_sdpa, "residue_layout", lambda *a: (calls.append(1), real(*a))[1])
    monkeypatch.setattr(fused_attention, "COMPRESSED_SDPA_MIN_TOKENS", 0)
    outs = {}
    for fused in (True, False):
        m.fused_backward = fused
        m.zero_grad()
        calls.clear()
        xx = x.clone().requires_grad_()
        y, br = m(xx, cu_t, return_branches=True)
        y.square().sum().backward()
        assert calls, f"fused_backward={fused}: the SDPA path did not run"
        outs[fused] = (y.detach(), br["compressed"].detach(), br["block_indices"], xx.grad,
                       m.k_cmp_weight.grad.clone())
    assert torch.equal(outs[True][1], outs[False][1]), "compressed branch"
    assert torch.equal(outs[True][2], outs[False][2]), "block choice"
    for name, a, b in zip(("y", "x", "k_cmp_weight"), (outs[True][0],) + outs[True][3:],
                          (outs[False][0],) + outs[False][3:]):
        assert_close(a, b, torch.float32, name)
    monkeypatch.setattr(fused_attention, "COMPRESSED_SDPA_MIN_TOKENS", 151)
    calls.clear()
    q = torch.randn(150, 6, 16)
    k_cmp, cu_cmp = branches.compress_kv(torch.randn(150, 2, 16), cu_t, 8, 4)
    branches.compressed_attention(q, k_cmp, k_cmp, cu_t, cu_cmp, 8, 4)
    assert not calls, "a call below COMPRESSED_SDPA_MIN_TOKENS took the SDPA path"


@pytest.mark.gpu
def test_gpu_module_with_both_compression_switches_bf16(monkeypatch):
    """NativeSparseAttention (FSA, bf16, 16K tokens, 32 query / 8 KV heads, d = 128) with the compressed
    branch on cuDNN (COMPRESSED_SDPA_MIN_TOKENS = 0) and the compression in place (IN_PLACE_LINEAR)
    against both off: the compressed branch's output, the gradients that reach the projections and
    compression weights through it (a loss on that branch alone), and the block selections (ranks can
    flip on near-ties under different roundings: at least 99% of the selected blocks shared)."""
    from nsa_baseline.module import NativeSparseAttention
    from nsa_baseline.ops import compression_grad

    torch.manual_seed(0)
    m = NativeSparseAttention(2048, 32, 8, 128, backend="fsa").cuda().to(torch.bfloat16)
    with torch.no_grad():
        for p in (m.k_cmp_weight, m.v_cmp_weight, m.k_cmp_pos, m.v_cmp_pos):
            p.add_(0.02 * torch.randn_like(p))
    x = torch.randn(16384, 2048, device="cuda", dtype=torch.bfloat16)

    def run():
        m.zero_grad()
        xx = x.clone().requires_grad_()
        _, br = m(xx, return_branches=True)
        br["compressed"].float().square().sum().backward()
        grads = [xx.grad] + [p.grad.clone() for p in (m.q_proj.weight, m.k_cmp_weight, m.v_cmp_weight)]
        return br["compressed"].detach(), br["block_indices"], grads

    monkeypatch.setattr(fused_attention, "COMPRESSED_SDPA_MIN_TOKENS", None)
    monkeypatch.setattr(compression_grad, "IN_PLACE_LINEAR", False)
    o_off, idx_off, g_off = run()
    monkeypatch.setattr(fused_attention, "COMPRESSED_SDPA_MIN_TOKENS", 0)
    monkeypatch.setattr(compression_grad, "IN_PLACE_LINEAR", True)
    o_on, idx_on, g_on = run()
    errs = {"o_cmp": rel_err(o_on, o_off)}
    errs.update({name: rel_err(a, b) for name, a, b in zip(("x", "q_proj", "k_cmp_weight", "v_cmp_weight"),
                                                           g_on, g_off)})
    assert all(e <= 4e-2 for e in errs.values()), errs
    # Random inputs give nearly flat block scores, so a last-bit change flips near-ties in ~3% of the rows
    # (H100, 63122c6: 97.1% of the sets equal); each flip swaps a block or two of the 16. A wrong score
    # (a misplaced lse, a missing summary) moves most of a row's blocks.
    kept = (idx_on[..., :, None] == idx_off[..., None, :]).any(-1).float().mean().item()
    assert kept >= 0.99, f"only {kept:.4f} of the selected blocks are shared"


def test_routing_declines_more_query_rows_than_max_query_rows(monkeypatch):
    """routed_sequences sends a call to the fused kernels only from min_tokens on and up to
    MAX_QUERY_ROWS token x head rows (256K x 64 heads ran out of memory on an 80 GB H100 there)."""
    from nsa_baseline.ops import compressed_sdpa

    n, hq, h, d, ks, st = 256, 4, 2, 16, 32, 16
    q = torch.randn(n, hq, d)
    k_cmp = torch.randn((n - ks) // st + 1, h, d)
    assert compressed_sdpa.routed_sequences(q, k_cmp, None, None, ks, st, 128) is not None
    assert compressed_sdpa.routed_sequences(q, k_cmp, None, None, ks, st, n + 1) is None
    monkeypatch.setattr(compressed_sdpa, "MAX_QUERY_ROWS", n * hq - 1)
    assert compressed_sdpa.routed_sequences(q, k_cmp, None, None, ks, st, 128) is None
