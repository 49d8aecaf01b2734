"""Cost model: the paper's stated ratios, the NUMBERS.md table, and exact counts on hand-made indices."""
import pytest
import torch

from experiments import cost_model as cm
from nsa_baseline.utils.indices import random_causal_block_indices

N, D, H = 65536, 128, 4


def test_paper_ratios_at_g4_64k_match_the_text():
    mem, flops = cm.paper_ratios(N, D, 4 * H, H, 64, 16)
    assert round(mem, 3) == 0.213  # "FSA memory traffic is 21.3% of NSA's"
    assert abs(flops - 0.562) < 1e-3  # "FSA FLOPs are 56.2% of NSA's" (0.5625)


@pytest.mark.parametrize("g, mem, flops", [(1, 0.066, 0.188), (2, 0.115, 0.313), (4, 0.213, 0.563),
                                           (8, 0.409, 1.06)], ids=lambda x: str(x))
def test_paper_ratios_match_numbers_table(g, mem, flops):
    got_mem, got_flops = cm.paper_ratios(N, D, g * H, H, 64, 16)
    assert got_mem == pytest.approx(mem, abs=6e-4)
    assert got_flops == pytest.approx(flops, abs=6e-3)


def test_stats_from_hand_made_indices():
    # one sequence of 5 tokens, BS=2, one kv head, T=2: token 4 is in block 2 and sees 1 key of it
    idx = torch.tensor([[[0, -1]], [[0, -1]], [[1, 0]], [[1, -1]], [[2, 0]]], dtype=torch.int32)
    s = cm.stats_from_indices(idx, block_size=2)
    assert s.pairs == 7
    assert s.visible_keys == 1 + 2 + (1 + 2) + 2 + (1 + 2)
    assert s.blocks_touched == 3
    nsa = cm.nsa_cost(s, group=2, d=4, elem=2)
    assert nsa.flops == 4 * 16 * 2 * 4 * 7  # G=2 padded to a 16-row tile, whole blocks
    assert nsa.useful_flops == 4 * 4 * 2 * s.visible_keys
    fsa = cm.fsa_cost(s, group=2, d=4, elem=2)
    assert fsa.flops == 7 * 2 * 4 * (4 * 2 + 2)


def test_closed_form_uniform_counts_equal_counts_of_generated_indices():
    n, h, bs, t = 700, 2, 16, 6
    idx = random_causal_block_indices(n, h, t, bs, generator=torch.Generator().manual_seed(0))
    measured = cm.stats_from_indices(idx, bs)
    closed = cm.stats_uniform_random(n, h, bs, t)
    assert (closed.pairs, closed.visible_keys, closed.blocks_touched) == \
        (measured.pairs, measured.visible_keys, measured.blocks_touched)


def test_exact_fsa_traffic_tends_to_the_paper_formula_with_full_blocks():
    s = cm.SelectionStats(num_tokens=N, num_kv_heads=H, block_size=64, pairs=N * H * 16.0,
                          visible_keys=N * H * 16 * 64.0, blocks_touched=N // 64 * H)
    fsa = cm.fsa_cost(s, group=4, d=D, elem=2)
    extras = cm.STAT_BYTES * ((2 + 4) * s.pairs + 4 * H * N) + cm.INDEX_BYTES * 2 * s.pairs
    assert fsa.bytes - extras == pytest.approx(cm.paper_fsa_bytes(N, D, 4 * H, H, 16))
    assert fsa.flops == pytest.approx(cm.paper_fsa_flops(N, D, 4 * H, H, 64, 16))


def test_nsa_tile_rows_and_dense_cost():
    assert [cm.nsa_tile_rows(g) for g in (1, 4, 16, 17, 32)] == [16, 16, 16, 32, 32]
    dense = cm.dense_causal_cost(1024, 1, 8, 2, 64)
    assert dense.flops == 4 * 1024 * 1024 / 2 * 64 * 8
    assert cm.dense_causal_cost(1024, 1, 8, 2, 64).for_pass("fwd+bwd").flops == pytest.approx(3.5 * dense.flops)


def test_roofline_takes_the_slower_bound():
    c = cm.Cost(flops=1e12, bytes=1e9, useful_flops=1e12)
    assert cm.roofline_ms(c, peak_tflops=1000, peak_gbps=1000) == pytest.approx(1.0)
    assert cm.roofline_ms(c, peak_tflops=100, peak_gbps=1000) == pytest.approx(10.0)
