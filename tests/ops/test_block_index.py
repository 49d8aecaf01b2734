"""The inverted block -> query index against a brute-force Python inversion."""
import pytest
import torch

from nsa_baseline.utils.block_index import build_block_index
from nsa_baseline.utils.indices import random_causal_block_indices
from tests.helpers import sm90_resources


def brute_force_rows(block_indices, block_size, cu_seqlens):
    """{(h, seq, block): [tokens]} for valid causal pairs, and each row's block span."""
    n, h, _ = block_indices.shape
    bounds = cu_seqlens.tolist()
    rows = {}
    for s in range(len(bounds) - 1):
        c0, c1 = bounds[s], bounds[s + 1]
        for b in range((c1 - c0 + block_size - 1) // block_size):
            for i_h in range(h):
                rows[(i_h, s, b)] = [t for t in range(c0, c1)
                                     if b in block_indices[t, i_h].tolist() and c0 + b * block_size <= t]
    return rows


@pytest.mark.parametrize("keys", ["int16", "int32"])
@pytest.mark.parametrize("seqlens,block_size", [([7, 93, 130], 16), ([0, 64, 1, 65], 32), ([200], 64)],
                         ids=["varlen-bs16", "empty-and-short-bs32", "single-bs64"])
def test_index_matches_brute_force(seqlens, block_size, keys, monkeypatch):
    """Both key widths of the sort (int16 while the rows fit, else int32) give the same index."""
    from nsa_baseline.utils import block_index

    if keys == "int32":
        monkeypatch.setattr(block_index, "INT16_KEYS_BELOW", 0)
    sorted_dtypes, real_sort = [], torch.sort
    monkeypatch.setattr(torch, "sort", lambda x, **kw: (sorted_dtypes.append(x.dtype), real_sort(x, **kw))[1])
    cu = torch.tensor([0] + list(torch.tensor(seqlens).cumsum(0).tolist()), dtype=torch.int32)
    n, h, t_sel = int(cu[-1]), 2, 4
    bi = random_causal_block_indices(n, h, t_sel, block_size, cu_seqlens=cu)
    bi[0, 0, 0] = 5  # a block in the future (or outside the sequence): never a valid pair
    bi[n // 2, 1, :] = -1
    bi[n - 1, 0, 1] = 1 << 30  # absurd value: must be dropped, not read
    index = build_block_index(bi, block_size, cu, h)
    monkeypatch.setattr(torch, "sort", real_sort)
    assert sorted_dtypes == [getattr(torch, keys)]
    expected = brute_force_rows(bi, block_size, cu)
    bounds = cu.tolist()
    seen = 0
    for (i_h, s, b), toks in expected.items():
        gb = bounds[s] // block_size + s + b
        r = i_h * index.nb_bound + gb
        lo, hi = index.row_offsets[r].item(), index.row_offsets[r + 1].item()
        assert index.tokens[lo:hi].tolist() == toks, (i_h, s, b)
        assert index.block_start[gb].item() == bounds[s] + b * block_size
        assert index.block_end[gb].item() == min(bounds[s] + (b + 1) * block_size, bounds[s + 1])
        for p in range(lo, hi):  # pair_pos points back at p from exactly one slot naming block b
            t = index.tokens[p].item()
            slot = (index.pair_pos[t, i_h] == p).nonzero().flatten().tolist()
            assert len(slot) == 1 and bi[t, i_h, slot[0]].item() == b, (t, i_h, p)
        seen += hi - lo
    assert index.row_offsets[-1].item() == seen == int((index.pair_pos >= 0).sum())


def test_int16_key_kernels_compile_for_sm90():
    """The interpreter does not type the kernels: compile the key and scatter kernels for sm_90 with
    int16 keys (Triton's ahead-of-time path, no GPU, in a subprocess without TRITON_INTERPRET)."""
    out = sm90_resources(
        "from nsa_baseline.utils.block_index import _pair_keys_kernel as pk, _scatter_pairs_kernel as sp",
        "print(resources(compile_sm90(pk, 'i16', dict(H=64, T=16, BS=64, SEARCH_STEPS=1, BLOCK=1024), 4, 1,"
        " scalars={'N': 'i32', 'B': 'i32', 'NB_BOUND': 'i32', 'NUM_ROWS': 'i32'},"
        " int_ptrs={'block_indices', 'cu_seqlens', 'counts'})))",
        "print(resources(compile_sm90(sp, 'i16', dict(H=64, T=16, BLOCK=1024), 4, 1,"
        " scalars={'TOTAL': 'i32', 'NUM_ROWS': 'i32'}, int_ptrs={'tokens', 'pair_pos'})))")
    assert out.count("spill(stack)     0 B") == 2, out
