"""rel_err's sampled-row references agree with the full references of nsa_baseline."""
import torch

from experiments import accuracy
from experiments.inputs import Inputs
from experiments.points import Point
from nsa_baseline.reference import selected_attention_ref
from nsa_baseline.utils.indices import random_causal_block_indices


def test_sampled_selected_rows_match_the_reference_over_two_sequences():
    point = Point("selected", 3, 2, 16, 96, 2, 16, 3, "float32", "random")
    n = point.num_tokens
    q, k, v = torch.randn(n, 6, 16), torch.randn(n, 2, 16), torch.randn(n, 2, 16)
    cu = torch.tensor([0, 96, 192], dtype=torch.int32)
    idx = random_causal_block_indices(n, 2, 3, 16, cu_seqlens=cu)
    inp = Inputs(q, k, v, cu, idx)
    full = selected_attention_ref(q, k, v, idx, 16, cu_seqlens=cu)
    err, note = accuracy.output_rel_err("selected", full, inp, point, ref_rows=40, seed=1)
    assert err < 1e-6 and note == ""
    wrong = full.clone()
    wrong[100:] = 0
    assert accuracy.output_rel_err("selected", wrong, inp, point, ref_rows=40, seed=1)[0] > 0.1


def test_inputs_from_the_nsa_path_are_valid_causal_indices():
    from experiments.inputs import make_inputs
    from experiments.schema import SelectionConfig
    from nsa_baseline.contract import check_block_indices

    point = Point("selected", 2, 2, 32, 256, 2, 32, 4, "float32", "nsa")
    inp = make_inputs(point, SelectionConfig(), torch.device("cpu"), seed=3)
    assert inp.block_indices.shape == (512, 2, 4) and inp.q.std() > 0.5
    check_block_indices(inp.block_indices, 32, inp.cu_seqlens)
    pos = torch.arange(512) % 256
    assert (inp.block_indices.long() * 32 <= pos[:, None, None]).all()  # causal
