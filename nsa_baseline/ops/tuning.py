"""Launch parameters of the NSA kernels (the counterpart of fsa/tuning.py).

Query-outer kernels (selected forward, dQ): (D_PAD, BS) -> (num_warps, num_stages, skip_unused).
skip_unused=False keeps the loop body straight so that the K/V loads are pipelined (cp.async); with
the branch around unused slots they are not (checked in the sm_90 PTX). Block-owning dK/dV kernel:
(D_PAD, BS, G) -> (BLOCK_M, num_warps, num_stages), G = 0 meaning any G; entries not measured come
from the sm_90 register report (no spills: the dK, dV accumulators are [BS, D_PAD] fp32).
Selection scores / top-T kernel: rows per dot, summaries per tile, warps, stages (no spills on sm_90
at D = 128). experiments/gpu/nsa_check.py and experiments/gpu/branches_check.py sweep these; the
measurements behind the entries are in results/nsa_tune/README.md.
"""
from __future__ import annotations

QueryOuterConfig = tuple[int, int, bool]  # (num_warps, num_stages, skip_unused)

FWD_CONFIGS: dict[tuple[int, int], QueryOuterConfig] = {
    (64, 64): (4, 2, False), (128, 64): (4, 2, False), (256, 64): (8, 2, False),
    (64, 128): (4, 2, False), (128, 128): (4, 2, False), (256, 128): (8, 2, False),
}
DQ_CONFIGS: dict[tuple[int, int], QueryOuterConfig] = {**FWD_CONFIGS, (128, 128): (8, 2, False)}

DKDV_CONFIGS: dict[tuple[int, int, int], tuple[int, int, int]] = {
    (64, 16, 0): (64, 4, 2), (128, 16, 0): (64, 4, 2), (256, 16, 0): (32, 8, 2),
    (64, 32, 0): (64, 4, 2), (128, 32, 0): (64, 8, 2), (256, 32, 0): (32, 8, 2),
    (64, 64, 0): (64, 8, 2), (128, 64, 0): (64, 4, 2), (128, 64, 1): (128, 8, 3), (256, 64, 0): (32, 8, 3),
    (64, 128, 0): (32, 8, 2), (128, 128, 0): (128, 8, 3), (128, 128, 1): (128, 8, 2), (256, 128, 0): (32, 16, 2),
}
# A CSR row longer than one chunk is split over several programs (the attention-sink block 0 is
# listed by every query); chunk = max(DKDV_MIN_CHUNK_TILES * BLOCK_M, N * H * T * G / DKDV_SPLIT_SLOTS)
# rows, which bounds the fp32 partial buffer by 2 * DKDV_SPLIT_SLOTS blocks without a host sync.
DKDV_MIN_CHUNK_TILES = 64
DKDV_SPLIT_SLOTS = 512

# Selection kernel: BM = rows (BLOCK_Q tokens x G_PAD heads) per dot, BC = summaries per tile; merge =
# how each tile's block scores enter the running top-T sets: "bitonic" (a fixed sorting network per
# tile, used where a tile holds >= T_PAD blocks) or "insert" (one candidate per step; the slowest row
# of a tile sets the steps). NVIDIA H200, 64 query heads, d = 128, (64, 16) (results/stage_bench):
# bitonic with 64 rows takes 42.0 ms at 64K G = 1 (insert: 58.9 with 32 rows, 79.0 with 64), 2.9 ms
# at 16K G = 1 (5.5), 21.4 ms at 64K G = 4 (27.1), 13.1 ms at G = 16 (13.8).
# keys (merge="bitonic"): width of the packed (score, block id) keys the network sorts: 64 (exact up to
# fp32) or 32 (the score's low 12 mantissa bits hold the block id: ranks to a relative 2^-11, for up to
# 4096 blocks per sequence). 32 is faster (H100, results/stage_bench: 64K G = 1 41.0 -> 29.0 ms, module
# fwd+bwd 192.9 -> 180.2 ms) but picks another near-tied block in 1-8% of the rows of flat random scores
# (more with larger G), so the module's choices drift from the reference's and from decoding's: off by
# default. A hybrid that inserted the later tiles' candidates one by one was slower at every shape
# (64K G = 1: 51-66 ms against 41 ms for the network alone) and was removed.
SELECTION_CONFIG = dict(rows=64, summaries=64, num_warps=4, num_stages=2, merge="bitonic", keys=64)


def query_outer_config(table, d_pad: int, block_size: int, num_warps=None, num_stages=None,
                       skip_unused=None) -> QueryOuterConfig:
    """(num_warps, num_stages, skip_unused): explicit arguments win, then the table, then a guess."""
    w, s, k = table.get((d_pad, block_size), (4 if d_pad * block_size <= 128 * 64 else 8, 2, False))
    return (num_warps or w), (num_stages or s), (k if skip_unused is None else skip_unused)


def dkdv_config(d_pad: int, block_size: int, group: int, block_m=None, num_warps=None, num_stages=None):
    """(BLOCK_M, num_warps, num_stages): explicit arguments win, then the table, then a guess."""
    key = (d_pad, block_size, group) if (d_pad, block_size, group) in DKDV_CONFIGS else (d_pad, block_size, 0)
    guess = (64 if block_size * d_pad <= 64 * 128 else 32, 8 if block_size * d_pad <= 128 * 128 else 16, 2)
    m, w, s = DKDV_CONFIGS.get(key, guess)
    return (block_m or m), (num_warps or w), (num_stages or s)


def selection_config(config=None) -> dict:
    """The selection kernel's launch entries: SELECTION_CONFIG, overridden by `config`."""
    return {**SELECTION_CONFIG, **(config or {})}
