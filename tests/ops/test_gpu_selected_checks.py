"""GPU correctness of selected attention, from the one-call scripts whose timing halves stay in
experiments/gpu/: nsa_check.py's points (NSA, bf16 vs the fp32 reference, packed sequences, odd g
and d, 64K forward; the backward bitwise repeatable) and fsa_bench.py's (both families at the
benchmark's 4 KV heads, d = 128, NSA-path and random indices, N <= 16K as its --check-max-seqlen).
Bound: bf16 relative error 2e-2 (tests/helpers.py), nsa_check's TOL; fsa_bench only recorded its
errors, so its points get the same bound."""
import pytest
import torch

import fsa
import nsa_baseline
from nsa_baseline.reference import selected_attention_ref
from tests.helpers import assert_close
from tests.ops.cases import realistic_case
from tests.ops.harness import OUTPUT_NAMES, check_all, reference, run_selected

BF16 = torch.bfloat16
FAMILIES = {"nsa": nsa_baseline.selected_attention, "fsa": fsa.selected_attention}

NSA_CHECK_BACKWARD = [  # (N, H, G, D, BS, T, packed sequence lengths)
    pytest.param(4096, 4, 1, 128, 64, 16, [1500, 77, 2519], id="4K-g1-varlen"),
    pytest.param(4096, 4, 16, 128, 64, 16, [4096], id="4K-g16"),
    pytest.param(4096, 2, 3, 96, 32, 8, [33, 4000, 63], id="4K-g3-d96-varlen"),
    pytest.param(4096, 2, 5, 256, 128, 8, [2048, 2048], id="4K-g5-d256-2seq"),
    pytest.param(4096, 4, 4, 192, 64, 16, [4096], id="4K-g4-d192"),
]
NSA_CHECK_FORWARD = [
    pytest.param(65536, 4, 4, 128, 64, 16, None, id="64K-g4"),
    pytest.param(32768, 4, 16, 128, 128, 8, [20000, 12768], id="32K-g16-bs128-2seq"),
]


def bitwise_repeatable_and_close(fn, x, check_indices: bool) -> None:
    """fwd + bwd of `fn` twice (bit for bit the same), and within bf16 of the fp32 reference."""
    do = torch.randn_like(x.q)
    first = run_selected(fn, x, do, check_indices=check_indices)
    again = run_selected(fn, x, do, check_indices=False)
    for name, a, b in zip(OUTPUT_NAMES, first, again):
        assert torch.equal(a, b), f"{name} differs between two identical runs"
    check_all(first, reference(x, do, ref_dtype=torch.float32), BF16)


@pytest.mark.gpu
@pytest.mark.parametrize("n,h,g,d,bs,t_sel,seqlens", NSA_CHECK_BACKWARD)
def test_gpu_nsa_check_backward(n, h, g, d, bs, t_sel, seqlens):
    x = realistic_case(n, h, g, d, t_sel, bs, seqlens=seqlens)
    bitwise_repeatable_and_close(nsa_baseline.selected_attention, x, check_indices=True)


@pytest.mark.gpu
@pytest.mark.parametrize("n,h,g,d,bs,t_sel,seqlens", NSA_CHECK_FORWARD)
def test_gpu_nsa_check_forward(n, h, g, d, bs, t_sel, seqlens):
    x = realistic_case(n, h, g, d, t_sel, bs, seqlens=seqlens)
    with torch.no_grad():
        o, lse = nsa_baseline.selected_attention(x.q, x.k, x.v, x.block_indices, bs, cu_seqlens=x.cu_seqlens,
                                                 return_lse=True, check_indices=True)
        ro, rl = selected_attention_ref(x.q.float(), x.k.float(), x.v.float(), x.block_indices, bs,
                                        cu_seqlens=x.cu_seqlens, return_lse=True)
    assert_close(o, ro, BF16, "o")
    assert_close(lse, rl, BF16, "lse")


@pytest.mark.gpu
@pytest.mark.parametrize("family", FAMILIES.values(), ids=FAMILIES.keys())
@pytest.mark.parametrize("indices", ["nsa", "random"])
@pytest.mark.parametrize("bs,t_sel", [(64, 16), (128, 8)], ids=["64x16", "128x8"])
@pytest.mark.parametrize("g,n", [(1, 16384), (2, 8192), (4, 16384), (8, 8192), (16, 16384)],
                         ids=lambda p: str(p))
def test_gpu_fsa_bench_points(family, indices, bs, t_sel, g, n):
    x = realistic_case(n, 4, g, 128, t_sel, bs, nsa_indices=indices == "nsa")
    bitwise_repeatable_and_close(family, x, check_indices=False)
