"""selected_attention_ref against full causal attention (every block selected), per-sequence runs,
gradcheck, and rows that see nothing."""
import pytest
import torch

from nsa_baseline.reference import selected_attention_ref
from nsa_baseline.utils.indices import random_causal_block_indices
from nsa_baseline.utils.varlen import token_positions
from tests.helpers import assert_close
from tests.reference.sdpa import cu, qkv, sdpa_packed, seq_bounds


def all_causal_blocks(cu_seqlens, n, h, block_size, t_sel):
    """int32 [N, H, T]: every causal block of each token (slots in order), -1 after."""
    pos, _ = token_positions(cu_seqlens, n)
    j = torch.arange(t_sel)
    idx = torch.where(j[None, :] <= (pos // block_size)[:, None], j[None, :], -1)
    return idx[:, None, :].expand(n, h, t_sel).contiguous().int()


@pytest.mark.parametrize("lengths", [(37,), (5, 40, 19), (3, 1, 16)], ids=lambda x: f"L{x}")
@pytest.mark.parametrize("hq,h", [(3, 1), (10, 2), (4, 4)], ids=lambda x: str(x))
def test_all_blocks_equal_full_attention(lengths, hq, h):
    cs, bs, d = cu(*lengths), 16, 8
    n = sum(lengths)
    q, k, v = qkv(n, hq, h, d)
    idx = all_causal_blocks(cs, n, h, bs, t_sel=(max(lengths) + bs - 1) // bs + 1)
    # Shuffle the slots: the result must not depend on their order.
    idx = idx.gather(-1, torch.rand(idx.shape).argsort(-1))
    o, lse = selected_attention_ref(q, k, v, idx, bs, cu_seqlens=cs, return_lse=True)
    assert_close(o, sdpa_packed(q, k, v, cs), torch.float64, "o")
    assert lse.shape == (hq, n) and lse.dtype == torch.float32 and torch.isfinite(lse).all()


def test_varlen_equals_each_sequence_alone():
    lengths, bs, h, hq, d = (21, 50, 9), 16, 2, 6, 8
    cs, n = cu(*lengths), sum(lengths)
    q, k, v = qkv(n, hq, h, d)
    idx = random_causal_block_indices(n, h, 3, bs, cu_seqlens=cs)
    o, lse = selected_attention_ref(q, k, v, idx, bs, cu_seqlens=cs, return_lse=True)
    for a, b in seq_bounds(cs):
        o1, lse1 = selected_attention_ref(q[a:b], k[a:b], v[a:b], idx[a:b], bs, return_lse=True)
        assert_close(o[a:b], o1, torch.float64, "o")
        assert_close(lse[:, a:b], lse1, torch.float32, "lse")


def test_empty_rows_give_zero_and_minus_inf_without_nan():
    n, h, hq, d, bs = 20, 1, 5, 4, 16
    q, k, v = qkv(n, hq, h, d, requires_grad=True)
    idx = random_causal_block_indices(n, h, 2, bs)
    idx[:4] = -1  # the first four tokens select nothing
    o, lse = selected_attention_ref(q, k, v, idx, bs, return_lse=True)
    assert torch.equal(o[:4], torch.zeros_like(o[:4]))
    assert torch.isinf(lse[:, :4]).all() and (lse[:, :4] < 0).all() and torch.isfinite(lse[:, 4:]).all()
    o.sum().backward()
    for t in (q, k, v):
        assert not torch.isnan(t.grad).any()
    assert torch.equal(q.grad[:4], torch.zeros_like(q.grad[:4]))


@pytest.mark.parametrize("hq,h", [(3, 1), (5, 1)], ids=["g3", "g5"])
def test_gradcheck(hq, h):
    cs, bs, d = cu(5, 10), 4, 2
    q, k, v = qkv(15, hq, h, d, requires_grad=True)
    idx = random_causal_block_indices(15, h, 2, bs, cu_seqlens=cs)
    fn = lambda q, k, v: selected_attention_ref(q, k, v, idx, bs, cu_seqlens=cs)
    assert torch.autograd.gradcheck(fn, (q, k, v))
