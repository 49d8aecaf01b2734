"""Sliding-window and full causal reference attention against torch SDPA, per sequence."""
import pytest
import torch

import nsa_baseline.reference.window as window_mod
from nsa_baseline.reference import full_attention_ref, sliding_window_attention_ref
from tests.helpers import assert_close
from tests.reference.sdpa import cu, qkv, sdpa_packed, seq_bounds

LENGTHS = [(33,), (7, 1, 26), (2, 3)]


@pytest.mark.parametrize("lengths", LENGTHS, ids=lambda x: f"L{x}")
@pytest.mark.parametrize("hq,h", [(3, 1), (10, 2)], ids=["g3", "g5"])
@pytest.mark.parametrize("window", [1, 5, 16])
def test_window_matches_sdpa(lengths, hq, h, window):
    cs, n = cu(*lengths), sum(lengths)
    q, k, v = qkv(n, hq, h, 8)
    o = sliding_window_attention_ref(q, k, v, window, cs)
    assert_close(o, sdpa_packed(q, k, v, cs, window=window), torch.float64, "o")


@pytest.mark.parametrize("lengths", LENGTHS, ids=lambda x: f"L{x}")
def test_full_and_large_window_equal_sdpa_causal(lengths):
    cs, n = cu(*lengths), sum(lengths)
    q, k, v = qkv(n, 6, 2, 8)
    ref = sdpa_packed(q, k, v, cs, scale=0.3)
    o_full, lse_full = full_attention_ref(q, k, v, cs, scale=0.3, return_lse=True)
    o_win, lse_win = sliding_window_attention_ref(q, k, v, max(lengths), cs, scale=0.3, return_lse=True)
    assert_close(o_full, ref, torch.float64, "full")
    assert_close(o_win, ref, torch.float64, "window >= L")
    assert torch.equal(lse_full, lse_win) and lse_full.shape == (6, n) and lse_full.dtype == torch.float32


def test_varlen_equals_each_sequence_alone_and_chunking(monkeypatch):
    lengths = (19, 40, 5)
    cs, n = cu(*lengths), sum(lengths)
    q, k, v = qkv(n, 4, 4, 8)
    o, lse = sliding_window_attention_ref(q, k, v, 7, cs, return_lse=True)
    for a, b in seq_bounds(cs):
        o1, lse1 = sliding_window_attention_ref(q[a:b], k[a:b], v[a:b], 7, return_lse=True)
        assert_close(o[a:b], o1, torch.float64, "o")
        assert_close(lse[:, a:b], lse1, torch.float32, "lse")
    monkeypatch.setattr(window_mod, "_MAX_CHUNK", 3)  # many chunks, some crossing sequence ends
    o2, lse2 = sliding_window_attention_ref(q, k, v, 7, cs, return_lse=True)
    assert_close(o2, o, torch.float64, "chunked o")
    assert_close(lse2, lse, torch.float32, "chunked lse")
    assert_close(full_attention_ref(q, k, v, cs), sdpa_packed(q, k, v, cs), torch.float64, "chunked full")


@pytest.mark.parametrize("hq,h", [(3, 1), (5, 1)], ids=["g3", "g5"])
def test_gradcheck(hq, h):
    cs = cu(4, 7)
    q, k, v = qkv(11, hq, h, 2, requires_grad=True)
    both = lambda q, k, v: (sliding_window_attention_ref(q, k, v, 3, cs), full_attention_ref(q, k, v, cs))
    assert torch.autograd.gradcheck(both, (q, k, v))


def test_bad_arguments_name_the_argument():
    q, k, v = qkv(8, 4, 2, 8)
    with pytest.raises(ValueError, match="window_size"):
        sliding_window_attention_ref(q, k, v, 0)
    with pytest.raises(ValueError, match="`q`"):
        full_attention_ref(q[:, :3], k, v)
    with pytest.raises(ValueError, match="`k`, `v`"):
        full_attention_ref(q, k[:4], v)
    with pytest.raises(ValueError, match="scale"):
        full_attention_ref(q, k, v, scale=-1.0)
    with pytest.raises(ValueError, match="cu_seqlens"):
        full_attention_ref(q, k, v, cu_seqlens=torch.tensor([0, 8]))
