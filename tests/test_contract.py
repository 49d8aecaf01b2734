"""Every check of nsa_baseline.contract raises ValueError naming the argument; index value checks
and their toggles (argument, NSA_CHECK_INDICES)."""
import pytest
import torch

from nsa_baseline import checks
from nsa_baseline.contract import (CHECK_INDICES_ENV, check_block_indices, check_selected_args,
                                   index_checks_requested)

N, HQ, H, D, T, BS = 40, 6, 2, 8, 3, 16


@pytest.fixture(autouse=True)
def _fresh_cu_seqlens_cache():
    # The contract caches checked cu_seqlens by id(); a freed tensor's id can be reused by the next
    # test's tensor, so start every test with an empty cache.
    checks.forget_checked_cu_seqlens()
    yield
    checks.forget_checked_cu_seqlens()


def args(**over):
    a = dict(q=torch.randn(N, HQ, D), k=torch.randn(N, H, D), v=torch.randn(N, H, D),
             block_indices=torch.zeros(N, H, T, dtype=torch.int32), block_size=BS, cu_seqlens=None, scale=None)
    a.update(over)
    return a


def raises(arg: str, **over):
    with pytest.raises(ValueError, match=f"argument `{arg}`"):
        check_selected_args(**args(**over))


def test_valid_call_returns_sizes():
    cs = torch.tensor([0, 10, 40], dtype=torch.int32)
    a = check_selected_args(**args(cu_seqlens=cs, scale=0.5))
    assert (a.num_tokens, a.num_q_heads, a.num_kv_heads, a.group_size, a.head_dim, a.topk, a.block_size) == \
        (N, HQ, H, 3, D, T, BS)
    assert a.scale == 0.5 and a.batch == 2
    assert check_selected_args(**args()).scale == pytest.approx(D ** -0.5)
    assert check_selected_args(**args()).cu_seqlens.tolist() == [0, N]


@pytest.mark.parametrize("name", ["q", "k", "v", "block_indices"])
def test_not_a_tensor(name):
    raises(name, **{name: [[1.0]]})


@pytest.mark.parametrize("name,value", [
    ("q", torch.randn(N, HQ)),  # not 3-D
    ("k", torch.randn(N + 1, H, D)),  # wrong N
    ("k", torch.randn(N, H, D + 1)),  # wrong D
    ("v", torch.randn(N, H, D - 1)),
    ("v", torch.randn(N, H + 1, D)),  # kv heads differ from k
    ("q", torch.randn(N, 5, D)),  # HQ not a multiple of H
], ids=["q-2d", "k-N", "k-D", "v-D", "v-H", "q-HQ-not-multiple"])
def test_shapes(name, value):
    raises(name, **{name: value})


def test_empty_q():
    raises("q", q=torch.randn(0, HQ, D), k=torch.randn(0, H, D), v=torch.randn(0, H, D),
           block_indices=torch.zeros(0, H, T, dtype=torch.int32))
    raises("q", q=torch.randn(N, HQ, 0), k=torch.randn(N, H, 0), v=torch.randn(N, H, 0))


def test_dtypes():
    raises("q", q=torch.randint(0, 3, (N, HQ, D)), k=torch.randint(0, 3, (N, H, D)), v=torch.randint(0, 3, (N, H, D)))
    raises("k", k=torch.randn(N, H, D, dtype=torch.float64))
    raises("v", v=torch.randn(N, H, D, dtype=torch.float16))
    raises("q", q=torch.randn(N, HQ, D), supported_dtypes=(torch.float16,))


@pytest.mark.parametrize("name", ["k", "v", "block_indices"])
def test_devices_with_meta_tensors(name):
    # The meta device stands in for a second device: the check reads only metadata.
    src = args()[name]
    raises(name, **{name: torch.empty(src.shape, dtype=src.dtype, device="meta")})


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="cross-device check needs a CUDA device (covered on CPU with meta tensors above)")
def test_devices_cpu_vs_cuda():
    raises("k", q=torch.randn(N, HQ, D, device="cuda"), v=torch.randn(N, H, D, device="cuda"),
           block_indices=torch.zeros(N, H, T, dtype=torch.int32, device="cuda"))


def test_block_indices_dtype_shape_and_empty_topk():
    raises("block_indices", block_indices=torch.zeros(N, H, T, dtype=torch.int64))
    raises("block_indices", block_indices=torch.zeros(N, H + 1, T, dtype=torch.int32))
    raises("block_indices", block_indices=torch.zeros(N - 1, H, T, dtype=torch.int32))
    raises("block_indices", block_indices=torch.zeros(N, H, dtype=torch.int32))
    with pytest.raises(ValueError, match="argument `block_indices`.*T >= 1"):
        check_selected_args(**args(block_indices=torch.zeros(N, H, 0, dtype=torch.int32)))


def test_more_pairs_than_the_int32_index_holds_is_an_error_not_an_overflow():
    n, h, d, t = 2**21, 64, 128, 16  # N * H * T = 2^31: one past the int32 range (meta: no memory)
    q = k = torch.empty(n, h, d, device="meta", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"argument `block_indices`.*int32 pair index"):
        check_selected_args(q, k, k, torch.empty(n, h, t, device="meta", dtype=torch.int32), 64)


@pytest.mark.parametrize("block_size", [48, 8, 0, -64, 64.0, True, "64"])
def test_unsupported_block_size(block_size):
    raises("block_size", block_size=block_size)


@pytest.mark.parametrize("scale", [0, -0.5, float("nan"), "0.1", torch.tensor(0.1)])
def test_bad_scale(scale):
    raises("scale", scale=scale)


@pytest.mark.parametrize("cu_seqlens", [
    [0, 40],  # a list, not a tensor
    torch.tensor([0, 40]),  # int64
    torch.tensor([[0, 40]], dtype=torch.int32),  # 2-D
    torch.tensor([0], dtype=torch.int32),  # no sequence
    torch.tensor([1, 40], dtype=torch.int32),  # does not start at 0
    torch.tensor([0, 30, 20, 40], dtype=torch.int32),  # decreasing
    torch.tensor([0, 10, 39], dtype=torch.int32),  # does not end at total_tokens
    torch.tensor([0, 10, 41], dtype=torch.int32),
], ids=["list", "int64", "2d", "one-entry", "start", "decreasing", "end-short", "end-long"])
def test_bad_cu_seqlens(cu_seqlens):
    raises("cu_seqlens", cu_seqlens=cu_seqlens)


def test_cu_seqlens_cache_sees_in_place_changes():
    cs = torch.tensor([0, 10, 40], dtype=torch.int32)
    check_selected_args(**args(cu_seqlens=cs))
    cs[1] = 50  # bumps the tensor's version: must be checked again
    raises("cu_seqlens", cu_seqlens=cs)


# ---------------------------------------------------------------- index values
def test_block_indices_values_valid():
    cs = torch.tensor([0, 17, 40], dtype=torch.int32)
    idx = torch.full((N, H, T), -1, dtype=torch.int32)
    idx[:, :, 0] = 0
    idx[17 + 16:, :, 1] = 1  # tokens 16.. of the second sequence may use its block 1
    check_block_indices(idx, BS, cs)


def test_block_indices_out_of_range():
    idx = torch.zeros(N, H, T, dtype=torch.int32)
    idx[:, :, 1:] = -1
    idx[5, 1, 2] = 3  # a 40-token sequence has blocks 0..2
    with pytest.raises(ValueError, match="argument `block_indices`.*outside"):
        check_block_indices(idx, BS, torch.tensor([0, N], dtype=torch.int32))
    idx[5, 1, 2] = -2
    with pytest.raises(ValueError, match="argument `block_indices`.*outside"):
        check_block_indices(idx, BS, torch.tensor([0, N], dtype=torch.int32))


def test_block_indices_beyond_own_sequence():
    cs = torch.tensor([0, 17, 40], dtype=torch.int32)  # first sequence has blocks 0, 1 only
    idx = torch.full((N, H, T), -1, dtype=torch.int32)
    idx[3, 0, 0] = 2  # block 2 exists in the packed tensor but not in token 3's sequence
    with pytest.raises(ValueError, match="argument `block_indices`.*outside"):
        check_block_indices(idx, BS, cs)


def test_block_indices_duplicates():
    idx = torch.full((N, H, T), -1, dtype=torch.int32)
    idx[20, 1, 0] = idx[20, 1, 2] = 1
    with pytest.raises(ValueError, match="argument `block_indices`.*repeats"):
        check_block_indices(idx, BS, torch.tensor([0, N], dtype=torch.int32))


def test_repeated_minus_one_is_fine():
    idx = torch.full((N, H, T), -1, dtype=torch.int32)
    check_block_indices(idx, BS, torch.tensor([0, N], dtype=torch.int32))


@pytest.mark.parametrize("env,expected", [(None, False), ("0", False), ("", False), ("false", False),
                                          ("False", False), ("1", True), ("yes", True)])
def test_index_checks_env_toggle(monkeypatch, env, expected):
    if env is None:
        monkeypatch.delenv(CHECK_INDICES_ENV, raising=False)
    else:
        monkeypatch.setenv(CHECK_INDICES_ENV, env)
    assert index_checks_requested(None) is expected
    assert index_checks_requested(True) is True  # the argument wins over the environment
    assert index_checks_requested(False) is False
