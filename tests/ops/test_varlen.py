"""Token -> (sequence, position) maps for packed sequences, eager and under Inductor. Inductor's
searchsorted once ignored a sliced boundary tensor's offset (pytorch/pytorch#182343) and shifted
every token one sequence; the compiled NSA kernels then read keys outside their sequence."""
import pytest
import torch

from nsa_baseline.utils.varlen import token_positions, token_sequence_ids
from tests.reference.sdpa import cu

LENGTHS = [[7], [3000, 77, 5115], [5, 0, 0, 9, 1], [0, 4, 0]]  # empty sequences included


def _expected(lengths):
    seq = [s for s, n in enumerate(lengths) for _ in range(n)]
    pos = [p for n in lengths for p in range(n)]
    return torch.tensor(seq), torch.tensor(pos)


@pytest.mark.parametrize("lengths", LENGTHS, ids=str)
def test_sequence_ids_and_positions_match_a_python_loop(lengths, device):
    seq, pos = _expected(lengths)
    cu_seqlens, n = cu(*lengths).to(device), sum(lengths)
    assert torch.equal(token_sequence_ids(cu_seqlens, n).cpu(), seq)
    got_pos, got_len = token_positions(cu_seqlens, n)
    assert torch.equal(got_pos.cpu(), pos)
    assert torch.equal(got_len.cpu(), torch.tensor(lengths)[seq])


def test_positions_compiled_by_inductor_match_eager(device):
    """The default backend, as `torch.compile(model)` uses it around the selected-attention ops."""
    lengths = [3000, 77, 5115]
    cu_seqlens, n = cu(*lengths).to(device), sum(lengths)
    torch._dynamo.reset()
    pos, seq_len = torch.compile(lambda c: token_positions(c, n), fullgraph=True)(cu_seqlens)
    seq, want_pos = _expected(lengths)
    assert torch.equal(pos.cpu(), want_pos)
    assert torch.equal(seq_len.cpu(), torch.tensor(lengths)[seq])
