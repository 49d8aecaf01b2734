"""GPU correctness of NSA's non-selected branches against nsa_baseline.reference, from
experiments/gpu/branches_check.py (its timing half stays there): compression (mean and learned),
compressed attention, selection scores and top-T (alone, from the compressed keys, fused), sliding
window and full attention, fwd and bwd at 8K (one sequence and packed), forward at 64K; bf16,
4 KV heads, d = 128. Bounds as the script had them: relative error 2e-2 (5e-3 for the scores) and at
most 1% of rows with another block set (bf16 near-ties may swap a block)."""
import pytest
import torch

from nsa_baseline.ops.compressed import compressed_attention
from nsa_baseline.ops.compression import compress_kv
from nsa_baseline.ops.selection import (nsa_block_indices, select_blocks, select_blocks_from_compressed,
                                        selection_scores)
from nsa_baseline.ops.window import full_attention, sliding_window_attention
from nsa_baseline.reference.compressed import compressed_attention_ref, selection_scores_ref
from nsa_baseline.reference.compression import compress_kv as compress_kv_ref
from nsa_baseline.reference.selection import select_blocks_ref
from nsa_baseline.reference.window import full_attention_ref, sliding_window_attention_ref
from tests.helpers import rel_err

H, D, WINDOW = 4, 128, 512
KS, STRIDE, BS, TOPK = 32, 16, 64, 16
BF16 = torch.bfloat16
TOL = 2e-2  # bf16 relative-error bound (tests/helpers.py)
POINTS = [  # (N, G, cu_seqlens, backward): the script's check items
    pytest.param(8192, 4, None, True, id="8K-g4"),
    pytest.param(8192, 4, [0, 3000, 3010, 3100, 8192], True, id="8K-g4-varlen"),
    pytest.param(65536, 4, None, False, id="64K-g4-fwd"),
    pytest.param(8192, 16, None, True, id="8K-g16"),
    pytest.param(8192, 1, None, True, id="8K-g1"),
    pytest.param(65536, 16, None, False, id="64K-g16-fwd"),
]


def inputs(n, g, cu=None):
    q = torch.randn(n, H * g, D, device="cuda", dtype=BF16)
    k, v = torch.randn(n, H, D, device="cuda", dtype=BF16), torch.randn(n, H, D, device="cuda", dtype=BF16)
    return q, k, v, None if cu is None else torch.tensor(cu, dtype=torch.int32, device="cuda")


def grads(outs, ins, seed=1):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    dos = [torch.randn(o.shape, generator=gen, device="cuda", dtype=o.dtype) for o in outs]
    return torch.autograd.grad(outs, ins, dos)


def same_sets(a, b):
    return (a.sort(-1).values == b.sort(-1).values).all(-1).float().mean().item()


@pytest.mark.gpu
@pytest.mark.parametrize("n,g,cu,backward", POINTS)
def test_gpu_branches_match_the_reference(n, g, cu, backward):
    """Every op and quantity of one point within its bound; the failures listed together."""
    failures = []

    def record(op, qty, err, tol=TOL, note=""):
        if not err <= tol:  # NaN fails too
            failures.append(f"{op} {qty}: {err:.3e} > {tol:g}" + (f" ({note})" if note else ""))

    layout = "single" if cu is None else "varlen"
    q, k, v, cu = inputs(n, g, cu)
    # compression (mean for k/v; learned weight once)
    kk = k.clone().requires_grad_()
    w = (torch.randn(KS * D, D, device="cuda") / 64).to(BF16).requires_grad_()
    pe = (torch.randn(KS, D, device="cuda") / 8).to(BF16).requires_grad_()
    for name, args in (("compress_kv_mean", ()), ("compress_kv_weight", (w, pe))):
        out, _ = compress_kv(kk, cu, KS, STRIDE, *args)
        ref, _ = compress_kv_ref(kk, cu, KS, STRIDE, *args)
        record(name, "x_cmp", rel_err(out, ref))
        if backward:
            ins = (kk,) + tuple(args)
            for qty, a, b in zip(("dx", "dweight", "dpos_emb"), grads([out], ins), grads([ref], ins)):
                record(name, qty, rel_err(a, b))
    # compressed attention
    k_cmp, cu_cmp = compress_kv(k, cu, KS, STRIDE)
    v_cmp, _ = compress_kv(v, cu, KS, STRIDE)
    qq, kc, vc = (t.detach().clone().requires_grad_(backward) for t in (q, k_cmp, v_cmp))
    o, lse = compressed_attention(qq, kc, vc, cu, cu_cmp, KS, STRIDE)
    ro, rlse = compressed_attention_ref(qq, kc, vc, cu, cu_cmp, KS, STRIDE)
    record("compressed_attention", "o", rel_err(o, ro))
    record("compressed_attention", "lse", rel_err(lse, rlse))
    if backward:
        for qty, a, b in zip(("dq", "dk_cmp", "dv_cmp"), grads([o], (qq, kc, vc)), grads([ro], (qq, kc, vc))):
            record("compressed_attention", qty, rel_err(a, b))
    del o, ro, rlse
    # selection
    with torch.no_grad():
        s = selection_scores(q, k_cmp, lse.detach(), cu, cu_cmp, KS, STRIDE, BS)
        r = selection_scores_ref(q, k_cmp, lse.detach(), cu, cu_cmp, KS, STRIDE, BS)
        record("selection_scores", "scores", rel_err(s, r), tol=5e-3)
        idx, ridx = select_blocks(s, cu, BS, TOPK), select_blocks_ref(r, cu, BS, TOPK)
        frac = same_sets(idx, ridx)
        record("select_blocks", "rows with different block set", 1 - frac, tol=0.01,
               note="near-ties of bf16 scores may swap a block")
        from_cmp = select_blocks_from_compressed(q, k_cmp, cu, cu_cmp, KS, STRIDE, BS, TOPK, lse=lse.detach())
        record("select_blocks_from_compressed", "rows with different block set",
               1 - same_sets(from_cmp, ridx), tol=0.01, note="given the FlexAttention lse")
        fused = nsa_block_indices(q, k, cu, KS, STRIDE, BS, TOPK)
        frac = same_sets(fused, ridx)
        record("nsa_block_indices", "rows with different block set", 1 - frac, tol=0.01,
               note="in-kernel lse vs FlexAttention lse: near-ties")
        del s, r
    # sliding window (and full causal at <= 8K)
    for op in ("sliding_window_attention", "full_attention"):
        if op == "full_attention" and n > 8192:
            continue
        qq, kk2, vv = (t.detach().clone().requires_grad_(backward) for t in (q, k, v))
        if op == "full_attention":
            o = full_attention(qq, kk2, vv, cu)
            o2, lse2 = full_attention(qq, kk2, vv, cu, return_lse=True)
            ro, rlse = full_attention_ref(qq, kk2, vv, cu, return_lse=True)
        else:
            o = sliding_window_attention(qq, kk2, vv, WINDOW, cu)
            o2, lse2 = sliding_window_attention(qq, kk2, vv, WINDOW, cu, return_lse=True)
            ro, rlse = sliding_window_attention_ref(qq, kk2, vv, WINDOW, cu, return_lse=True)
        record(op, "o", rel_err(o, ro))
        record(op, "o (return_lse path)", rel_err(o2, ro))
        record(op, "lse", rel_err(lse2, rlse))
        if backward:
            for qty, a, b in zip(("dq", "dk", "dv"), grads([o], (qq, kk2, vv)), grads([ro], (qq, kk2, vv))):
                record(op, qty, rel_err(a, b))
        del o, o2, ro, rlse, lse2
    assert not failures, f"N={n} G={g} {layout}: " + "; ".join(failures)
