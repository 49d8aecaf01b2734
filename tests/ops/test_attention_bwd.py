"""softmax_bwd_delta (nsa_baseline.utils.attention_bwd) against rowsum(o * do) - dlse in float64."""
import pytest
import torch

from nsa_baseline.utils.attention_bwd import softmax_bwd_delta
from tests.helpers import assert_close


@pytest.mark.parametrize("n,hq,d,dtype", [(37, 3, 48, torch.float32), (5, 16, 64, torch.float16), (1, 1, 16, torch.float32)])
@pytest.mark.parametrize("with_dlse", [False, True])
def test_delta_matches_rowsum(n, hq, d, dtype, with_dlse):
    o, do = torch.randn(n, hq, d).to(dtype), torch.randn(n, hq, d).to(dtype)
    dlse = torch.randn(hq, n) if with_dlse else None
    ref = (o.double() * do.double()).sum(-1).t()
    if with_dlse:
        ref = ref - dlse.double()
    got = softmax_bwd_delta(o, do, dlse)
    assert got.dtype == torch.float32 and got.shape == (hq, n)
    assert_close(got, ref, torch.float32, "delta")


def test_delta_of_no_tokens():
    assert softmax_bwd_delta(torch.randn(0, 2, 16), torch.randn(0, 2, 16)).shape == (2, 0)


def test_preprocess_lse2_is_base2_and_inf_for_empty_rows():
    from nsa_baseline.utils.attention_bwd import softmax_bwd_preprocess

    o, do = torch.randn(9, 2, 16), torch.randn(9, 2, 16)
    lse = torch.randn(2, 9)
    lse[1, 3] = float("-inf")  # a row that sees no key
    lse2, delta = softmax_bwd_preprocess(o, do, lse)
    want = lse.double() * 1.4426950408889634
    want[1, 3] = float("inf")
    assert torch.equal(torch.isinf(lse2), torch.isinf(want)) and bool((lse2[1, 3] > 0))
    fin = torch.isfinite(want)
    assert_close(lse2[fin], want[fin], torch.float32, "lse2")
    assert_close(delta, (o.double() * do.double()).sum(-1).t(), torch.float32, "delta")
