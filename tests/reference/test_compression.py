"""compress_kv, compressed_attention_ref and selection_scores_ref against brute-force python loops."""
import math

import pytest
import torch

import nsa_baseline.reference.compressed as compressed_mod
from nsa_baseline.reference import (compress_kv, compressed_attention_ref, compressed_cu_seqlens,
                                    selection_scores_ref, token_compressed_offsets)
from tests.helpers import assert_close
from tests.reference.sdpa import cu, qkv, seq_bounds


def brute_compress(x, cs, ks, st, weight=None, pos_emb=None):
    rows = []
    for a, b in seq_bounds(cs):
        for i in range(max(0, (b - a - ks) // st + 1)):
            blk = x[a + i * st: a + i * st + ks]  # [ks, H, D]
            if weight is None:
                rows.append(blk.mean(0))
            else:
                rows.append(torch.stack([(blk[:, hh] + pos_emb).flatten() @ weight for hh in range(x.shape[1])]))
    return torch.stack(rows) if rows else x.new_zeros(0, *x.shape[1:])


def brute_compressed_attention(q, k_cmp, v_cmp, cs, ks, st, scale):
    """(o [N, HQ, D], lse [HQ, N], p: dict (token, hq) -> list of probabilities over its sequence's summaries)."""
    n, hq, d = q.shape
    g = hq // k_cmp.shape[1]
    o = torch.zeros_like(q)
    lse = torch.full((hq, n), -math.inf, dtype=torch.float64)
    probs = {}
    cc = compressed_cu_seqlens(cs, ks, st).tolist()
    for s, (a, b) in enumerate(seq_bounds(cs)):
        for t in range(b - a):
            vis = [i for i in range(cc[s + 1] - cc[s]) if i * st + ks - 1 <= t]
            for head in range(hq):
                if not vis:
                    probs[a + t, head] = []
                    continue
                logits = torch.stack([q[a + t, head] @ k_cmp[cc[s] + i, head // g] * scale for i in vis])
                p = torch.softmax(logits, 0)
                o[a + t, head] = sum(p[j] * v_cmp[cc[s] + i, head // g] for j, i in enumerate(vis))
                lse[head, a + t] = torch.logsumexp(logits, 0)
                probs[a + t, head] = p.tolist()
    return o, lse, probs


# ---------------------------------------------------------------- compress_kv
@pytest.mark.parametrize("ks,st", [(4, 2), (8, 4), (6, 3), (4, 4)], ids=lambda x: str(x))
@pytest.mark.parametrize("linear", [False, True], ids=["mean", "linear"])
def test_compress_kv_matches_loop(ks, st, linear):
    lengths, h, d = (3, 13, 8, 21), 2, 5
    cs, n = cu(*lengths), sum(lengths)
    x = torch.randn(n, h, d, dtype=torch.float64)
    w = torch.randn(ks * d, d, dtype=torch.float64) if linear else None
    pe = torch.randn(ks, d, dtype=torch.float64) if linear else None
    x_cmp, cu_cmp = compress_kv(x, cs, ks, st, w, pe)
    expected_counts = [max(0, (length - ks) // st + 1) for length in lengths]
    assert cu_cmp.dtype == torch.int32 and cu_cmp.tolist() == [0, *torch.tensor(expected_counts).cumsum(0).tolist()]
    assert_close(x_cmp, brute_compress(x, cs, ks, st, w, pe), torch.float64, "x_cmp")


def test_compress_kv_short_sequences_and_offsets():
    cs = cu(3, 1, 9, 2)
    x = torch.randn(15, 1, 4, dtype=torch.float64)
    x_cmp, cu_cmp = compress_kv(x, cs, 4, 2)
    assert cu_cmp.tolist() == [0, 0, 0, 3, 3] and x_cmp.shape == (3, 1, 4)
    assert token_compressed_offsets(cs, cu_cmp, 15).tolist() == [0] * 4 + [0] * 9 + [3] * 2
    empty, cu_empty = compress_kv(x[:3], None, 4, 2)
    assert empty.shape == (0, 1, 4) and cu_empty.tolist() == [0, 0]


def test_compress_kv_gradcheck():
    cs, ks, st, d = cu(7, 10), 4, 2, 3
    x = torch.randn(17, 2, d, dtype=torch.float64, requires_grad=True)
    w = torch.randn(ks * d, d, dtype=torch.float64, requires_grad=True)
    pe = torch.randn(ks, d, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, pe: compress_kv(x, cs, ks, st, w, pe)[0], (x, w, pe))
    assert torch.autograd.gradcheck(lambda x: compress_kv(x, cs, ks, st)[0], (x,))


def test_compress_kv_bad_arguments():
    x = torch.randn(10, 2, 4)
    for kwargs, name in [(dict(kernel_size=0), "kernel_size"), (dict(kernel_stride=5, kernel_size=4), "kernel_stride"),
                         (dict(weight=torch.randn(3, 4), pos_emb=torch.randn(4, 4), kernel_size=4, kernel_stride=2), "weight"),
                         (dict(weight=torch.randn(16, 4), kernel_size=4, kernel_stride=2), "pos_emb"),
                         (dict(cu_seqlens=torch.tensor([0, 10])), "cu_seqlens")]:
        with pytest.raises(ValueError, match=name):
            compress_kv(x, **kwargs)
    with pytest.raises(ValueError, match="`x`"):
        compress_kv(x[0])


# ---------------------------------------------------------------- compressed attention
@pytest.mark.parametrize("hq,h", [(3, 1), (10, 2), (2, 2)], ids=["g3", "g5", "g1"])
@pytest.mark.parametrize("ks,st", [(4, 2), (4, 4), (6, 2)], ids=lambda x: str(x))
def test_compressed_attention_matches_loop(hq, h, ks, st):
    lengths, d = (2, 17, 11), 4
    cs, n = cu(*lengths), sum(lengths)
    q, k, v = qkv(n, hq, h, d)
    k_cmp, cu_cmp = compress_kv(k, cs, ks, st)
    v_cmp, _ = compress_kv(v, cs, ks, st)
    o, lse = compressed_attention_ref(q, k_cmp, v_cmp, cs, cu_cmp, ks, st)
    o_ref, lse_ref, _ = brute_compressed_attention(q, k_cmp, v_cmp, cs, ks, st, d ** -0.5)
    assert_close(o, o_ref, torch.float64, "o")
    assert_close(lse, lse_ref, torch.float32, "lse")


def test_compressed_attention_empty_rows_varlen_and_chunks(monkeypatch):
    lengths, ks, st = (3, 20, 9), 4, 2
    cs, n = cu(*lengths), sum(lengths)
    q, k, v = qkv(n, 4, 2, 4, requires_grad=True)
    k_cmp, cu_cmp = compress_kv(k, cs, ks, st)
    v_cmp, _ = compress_kv(v, cs, ks, st)
    o, lse = compressed_attention_ref(q, k_cmp, v_cmp, cs, cu_cmp, ks, st)
    blind = torch.tensor([t < ks - 1 for a, b in seq_bounds(cs) for t in range(b - a)])  # sees no summary
    assert torch.equal(o[blind], torch.zeros_like(o[blind])) and not torch.isnan(o).any()
    assert (lse[:, blind] == -math.inf).all() and torch.isfinite(lse[:, ~blind]).all()
    o.sum().backward()
    assert not torch.isnan(q.grad).any() and torch.equal(q.grad[blind], torch.zeros_like(q.grad[blind]))
    for a, b in seq_bounds(cs):
        kc1, cc1 = compress_kv(k[a:b], None, ks, st)
        vc1, _ = compress_kv(v[a:b], None, ks, st)
        o1, lse1 = compressed_attention_ref(q[a:b], kc1, vc1, None, cc1, ks, st)
        assert_close(o[a:b], o1, torch.float64, "o alone")
        assert_close(lse[:, a:b], lse1, torch.float32, "lse alone")
    monkeypatch.setattr(compressed_mod, "_MAX_CHUNK", 2)
    o2, lse2 = compressed_attention_ref(q, k_cmp, v_cmp, cs, cu_cmp, ks, st)
    assert_close(o2, o, torch.float64, "chunked o")
    assert_close(lse2, lse, torch.float32, "chunked lse")


@pytest.mark.parametrize("hq,h", [(3, 1), (5, 1)], ids=["g3", "g5"])
def test_compressed_attention_gradcheck(hq, h):
    cs, ks, st = cu(4, 9), 4, 2  # the first three tokens of each sequence see nothing
    q = torch.randn(13, hq, 2, dtype=torch.float64, requires_grad=True)
    k_cmp, cu_cmp = compress_kv(torch.randn(13, h, 2, dtype=torch.float64), cs, ks, st)
    k_cmp.requires_grad_()
    v_cmp = torch.randn_like(k_cmp, requires_grad=True)
    fn = lambda q, kc, vc: compressed_attention_ref(q, kc, vc, cs, cu_cmp, ks, st)[0]
    assert torch.autograd.gradcheck(fn, (q, k_cmp, v_cmp))


def test_compressed_attention_bad_arguments():
    q, k, v = qkv(12, 4, 2, 4)
    k_cmp, cu_cmp = compress_kv(k, None, 4, 2)
    with pytest.raises(ValueError, match="cu_seqlens_cmp"):
        compressed_attention_ref(q, k_cmp, k_cmp, None, cu(2, 3), 4, 2)
    with pytest.raises(ValueError, match="k_cmp"):
        compressed_attention_ref(q, k_cmp[:, :, :3], k_cmp, None, cu_cmp, 4, 2)
    with pytest.raises(ValueError, match="v_cmp"):
        compressed_attention_ref(q, k_cmp, k_cmp[:2], None, cu_cmp, 4, 2)
    with pytest.raises(ValueError, match="`q`"):
        compressed_attention_ref(q[:, :3], k_cmp, k_cmp, None, cu_cmp, 4, 2)


# ---------------------------------------------------------------- selection scores
def brute_scores(probs, cs, n, hq, h, ks, st, bs):
    g, r_sub, k_sub = hq // h, bs // st, ks // st
    nb = math.ceil(max(b - a for a, b in seq_bounds(cs)) / bs)
    out = torch.full((n, h, nb), -math.inf)
    for a, b in seq_bounds(cs):
        for t in range(a, b):
            for kv in range(h):
                for j in range(math.ceil((b - a) / bs)):
                    total = 0.0
                    for head in range(kv * g, (kv + 1) * g):
                        p = probs[t, head]
                        for m in range(r_sub):
                            for nn in range(k_sub):
                                i = r_sub * j + m - nn
                                if 0 <= i < len(p):
                                    total += p[i]
                    out[t, kv, j] = total
    return out


@pytest.mark.parametrize("ks,st,bs", [(4, 2, 8), (4, 4, 4), (4, 2, 4), (6, 2, 12)], ids=lambda x: str(x))
@pytest.mark.parametrize("hq,h", [(3, 1), (4, 2)], ids=["g3", "g2"])
def test_selection_scores_match_loop(ks, st, bs, hq, h, monkeypatch):
    lengths = (3, 25, 14)
    cs, n = cu(*lengths), sum(lengths)
    q, k, _ = qkv(n, hq, h, 4)
    k_cmp, cu_cmp = compress_kv(k, cs, ks, st)
    _, lse = compressed_attention_ref(q, k_cmp, k_cmp, cs, cu_cmp, ks, st)
    _, _, probs = brute_compressed_attention(q, k_cmp, k_cmp, cs, ks, st, 4 ** -0.5)
    ref = brute_scores(probs, cs, n, hq, h, ks, st, bs)
    scores = selection_scores_ref(q, k_cmp, lse, cs, cu_cmp, ks, st, bs)
    assert scores.dtype == torch.float32
    assert_close(scores, ref, torch.float32, "scores", tol=1e-5)
    monkeypatch.setattr(compressed_mod, "_MAX_CHUNK", 3)
    assert_close(selection_scores_ref(q, k_cmp, lse, cs, cu_cmp, ks, st, bs), scores, torch.float32, "chunked")


def test_selection_scores_sum_of_overlaps():
    # Each visible summary counts once per stride-sized sub-block: summed over blocks, a query's
    # scores are G * (kernel_size / stride) when it sees at least one summary.
    q, k, _ = qkv(40, 4, 2, 4)
    k_cmp, cu_cmp = compress_kv(k, None, 8, 4)
    _, lse = compressed_attention_ref(q, k_cmp, k_cmp, None, cu_cmp, 8, 4)
    scores = selection_scores_ref(q, k_cmp, lse, None, cu_cmp, 8, 4, 16)
    total = scores.sum(-1)
    assert torch.allclose(total[7:], torch.full_like(total[7:], 2 * 2), atol=1e-5)
    assert torch.equal(total[:7], torch.zeros_like(total[:7]))


def test_selection_scores_bad_arguments():
    q, k, _ = qkv(12, 2, 1, 4)
    k_cmp, cu_cmp = compress_kv(k, None, 4, 2)
    _, lse = compressed_attention_ref(q, k_cmp, k_cmp, None, cu_cmp, 4, 2)
    with pytest.raises(ValueError, match="block_size"):
        selection_scores_ref(q, k_cmp, lse, None, cu_cmp, 4, 2, 6 - 1)
    with pytest.raises(ValueError, match="block_size"):
        selection_scores_ref(q, k_cmp, lse, None, cu_cmp, 8, 4, 4)
    with pytest.raises(ValueError, match="kernel_stride"):
        selection_scores_ref(q, k_cmp, lse, None, cu_cmp, 6, 4, 8)
    with pytest.raises(ValueError, match="lse"):
        selection_scores_ref(q, k_cmp, lse[:, :5], None, cu_cmp, 4, 2, 8)
