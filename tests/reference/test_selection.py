"""select_blocks_ref (forced, distinct, causal, top scoring) and the fused nsa_block_indices_ref."""
import math

import pytest
import torch

import nsa_baseline.reference.compressed as compressed_mod
from nsa_baseline.reference import (compress_kv, compressed_attention_ref, nsa_block_indices_ref,
                                    select_blocks_from_compressed_ref, select_blocks_ref, selection_scores_ref)
from nsa_baseline.utils.varlen import token_positions
from tests.reference.sdpa import cu, qkv


def check_rows(idx, scores, cs, bs, topk, init_blocks, local_blocks):
    """Every row against a python statement of the rule."""
    n = idx.shape[0]
    pos, _ = token_positions(cs, n)
    for t in range(n):
        cur = int(pos[t]) // bs
        causal = list(range(cur + 1))
        forced = {j for j in causal if j < init_blocks or j > cur - local_blocks}
        for h in range(idx.shape[1]):
            row = idx[t, h].tolist()
            valid = [j for j in row if j >= 0]
            assert len(valid) == len(set(valid)), f"row {t},{h} repeats a block: {row}"
            assert all(j <= cur for j in valid), f"row {t},{h} is not causal: {row}"
            assert len(valid) == min(topk, len(causal)), f"row {t},{h} has {len(valid)} blocks: {row}"
            assert row[len(valid):] == [-1] * (topk - len(valid)), f"-1 must come last: {row}"
            assert forced <= set(valid), f"row {t},{h} misses forced blocks {forced}: {row}"
            rest = [j for j in causal if j not in forced]
            chosen = [j for j in valid if j not in forced]
            if chosen:
                worst = min(float(scores[t, h, j]) for j in chosen)
                best_left = max([float(scores[t, h, j]) for j in rest if j not in chosen], default=-math.inf)
                assert worst >= best_left, f"row {t},{h} skipped a higher-scoring block"
                assert [float(scores[t, h, j]) for j in chosen] == sorted(
                    (float(scores[t, h, j]) for j in chosen), reverse=True), "unforced slots not by score"


@pytest.mark.parametrize("topk,init_blocks,local_blocks", [(4, 1, 2), (3, 0, 1), (5, 2, 0), (2, 0, 0)],
                         ids=lambda x: str(x))
def test_select_blocks_rule(topk, init_blocks, local_blocks):
    lengths, bs, h = (5, 61, 33), 8, 3
    cs, n = cu(*lengths), sum(lengths)
    scores = torch.rand(n, h, 8)
    idx = select_blocks_ref(scores, cs, bs, topk, init_blocks, local_blocks)
    assert idx.dtype == torch.int32 and idx.shape == (n, h, topk)
    check_rows(idx, scores, cs, bs, topk, init_blocks, local_blocks)


def test_select_blocks_ignores_minus_inf_and_nan_blocks():
    scores = torch.rand(40, 1, 5)
    scores[:, :, 2] = float("nan")
    scores[:, :, 3] = float("-inf")
    idx = select_blocks_ref(scores, None, 8, 5, 0, 0)
    # Causal blocks are always selected while slots remain, whatever their score.
    for t in range(40):
        assert sorted(j for j in idx[t, 0].tolist() if j >= 0) == list(range(t // 8 + 1))


def test_select_blocks_bad_arguments():
    scores = torch.rand(16, 1, 2)
    with pytest.raises(ValueError, match="topk"):
        select_blocks_ref(scores, None, 8, 2, 1, 2)
    with pytest.raises(ValueError, match="topk"):
        select_blocks_ref(scores, None, 8, 0, 0, 0)
    with pytest.raises(ValueError, match="block_size"):
        select_blocks_ref(scores, None, 0, 3)
    with pytest.raises(ValueError, match="scores"):
        select_blocks_ref(scores, None, 4, 3)  # needs 4 blocks
    with pytest.raises(ValueError, match="init_blocks"):
        select_blocks_ref(scores, None, 8, 3, -1)


@pytest.mark.parametrize("hq,h", [(3, 1), (10, 2)], ids=["g3", "g5"])
def test_nsa_block_indices_equals_unfused_path(hq, h, monkeypatch):
    lengths, ks, st, bs, topk = (9, 70, 41), 4, 2, 8, 4
    cs, n = cu(*lengths), sum(lengths)
    q, k, _ = qkv(n, hq, h, 8)
    k_cmp, cu_cmp = compress_kv(k, cs, ks, st)
    _, lse = compressed_attention_ref(q, k_cmp, k_cmp, cs, cu_cmp, ks, st)
    scores = selection_scores_ref(q, k_cmp, lse, cs, cu_cmp, ks, st, bs)
    expected = select_blocks_ref(scores, cs, bs, topk)
    got = nsa_block_indices_ref(q, k, cs, ks, st, bs, topk)
    # Same sets per row (ties among forced blocks may be ordered differently).
    assert torch.equal(got.sort(-1).values, expected.sort(-1).values)
    check_rows(got, scores, cs, bs, topk, 1, 2)
    with_lse = select_blocks_from_compressed_ref(q, k_cmp, cs, cu_cmp, ks, st, bs, topk, lse=lse)
    assert torch.equal(with_lse.sort(-1).values, expected.sort(-1).values)
    monkeypatch.setattr(compressed_mod, "_MAX_CHUNK", 5)
    assert torch.equal(nsa_block_indices_ref(q, k, cs, ks, st, bs, topk).sort(-1).values, expected.sort(-1).values)


def test_nsa_block_indices_short_sequences_float32():
    cs = cu(1, 3, 30)
    q, k, _ = qkv(34, 2, 1, 8, dtype=torch.float32)
    idx = nsa_block_indices_ref(q, k, cs, 8, 4, 16, 2, 1, 1)
    assert idx.shape == (34, 1, 2) and idx.dtype == torch.int32
    assert (idx[:4, :, 0] == 0).all() and (idx[:4, :, 1] == -1).all()
    with pytest.raises(ValueError, match="block_size"):
        nsa_block_indices_ref(q, k, cs, 8, 4, 4)
