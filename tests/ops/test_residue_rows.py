"""ops/residue_rows.py: the tiled row moves of compressed_sdpa's residue layout equal index_select's
(the path without Triton), for one sequence and a padded packed batch."""
import pytest
import torch

from nsa_baseline.ops import compressed_sdpa
from nsa_baseline.ops.compressed_sdpa import _rows, _unrows, residue_layout, sdpa_sequences
from nsa_baseline.utils.compressed_varlen import compressed_cu_seqlens

CASES = {  # n, hq, h, d, kernel, stride, packed lengths (None: one sequence)
    "one-sequence": (203, 6, 2, 16, 32, 16, None),
    "packed-g3": (150, 6, 2, 24, 8, 4, (70, 50, 30)),  # D not a power of two: masked columns
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_tiled_moves_equal_index_select(monkeypatch, case):
    n, hq, h, d, ks, st, lengths = case
    if lengths:
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
        cu_cmp = compressed_cu_seqlens(cu, ks, st)
        seqs = sdpa_sequences(n, int(cu_cmp[-1]), cu, cu_cmp, ks, st, max_waste=1.0)
    else:
        seqs = sdpa_sequences(n, (n - ks) // st + 1)
    lay = residue_layout(n, hq, hq // h, ks, st, torch.device("cpu"), seqs)
    x = torch.randn(n, hq, d)
    call = torch.randn(lay.batch, lay.heads, lay.length, d)
    base = torch.full((n, hq, d), float("nan"))  # poisoned: every row must be written
    acc0 = torch.randn(n, hq, d)
    tiled = (_rows(x, lay), _unrows(call, lay, base.clone()), _unrows(call, lay, acc0.clone(), accumulate=True))
    monkeypatch.setattr(compressed_sdpa, "_tiled", lambda t: False)
    plain = (_rows(x, lay), _unrows(call, lay, base.clone()), _unrows(call, lay, acc0.clone(), accumulate=True))
    for name, a, b in zip(("gather", "scatter", "scatter-accumulate"), tiled, plain):
        assert not a.isnan().any(), f"{name}: unwritten rows"
        assert torch.equal(a, b), name
    assert not tiled[0].view(-1, d)[lay.empty].any()  # rows that are no query are zero


def test_a_strided_output_takes_the_plain_path():
    """dq given as a strided view (a caller's buffer) is written correctly, not through view()."""
    n, hq, h, d, ks, st = 96, 4, 2, 16, 8, 4
    lay = residue_layout(n, hq, hq // h, ks, st, torch.device("cpu"), sdpa_sequences(n, (n - ks) // st + 1))
    call = torch.randn(lay.batch, lay.heads, lay.length, d)
    want = _unrows(call, lay, torch.zeros(n, hq, d))
    big = torch.zeros(n, hq, 2 * d)
    got = _unrows(call, lay, big[:, :, :d])  # not contiguous
    assert torch.equal(got, want) and torch.equal(big[:, :, :d], want) and not big[:, :, d:].any()
