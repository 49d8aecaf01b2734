"""Analytic cost model: bytes moved and FLOPs of each kernel, as functions of the configuration.

Two levels, both for one forward call of selected attention (letters as everywhere: N tokens,
HQ query heads, H kv heads, G = HQ / H, D head dim, BS block size, T selected blocks):

* `paper_*`: the FSA paper's Appendix E formulas, verbatim. They assume
  every query selects T full blocks and 2-byte elements.
* `exact_cost`: counts from a `SelectionStats` (measured from real block_indices with
  `stats_from_indices`, or the closed-form expectation of the uniformly random causal generator with
  `stats_uniform_random`): valid (token, block) pairs, keys a query really sees (the partial block
  it sits in is masked), distinct blocks touched, and NSA's G tile padded to max(16, next_pow2(G))
  rows (what a Triton tl.dot needs).

`flops` is what a kernel executes (padding and masked keys included), `useful_flops` is the same
for every kernel (4 * D * visible keys per query head) and is what achieved TFLOP/s is computed
from, so kernels compare on one numerator. The backward has no paper formula: it is estimated as
2.5x the forward FLOPs (5 matmuls instead of 2) and 2x the forward bytes, and labelled so.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

INDEX_BYTES = 4  # int32 indices
STAT_BYTES = 4  # float32 lse / softmax statistics
BWD_FLOP_FACTOR = 2.5
BWD_BYTE_FACTOR = 2.0
PASS_FACTORS = {  # (flop factor, byte factor) relative to one forward
    "fwd": (1.0, 1.0),
    "bwd": (BWD_FLOP_FACTOR, BWD_BYTE_FACTOR),
    "fwd+bwd": (1.0 + BWD_FLOP_FACTOR, 1.0 + BWD_BYTE_FACTOR),
}


# ---------------------------------------------------------------- the paper's formulas (App. E)
def paper_fsa_bytes(n: int, d: int, hq: int, h: int, t: int) -> float:
    """FSA total memory traffic: d * N * (6h + 2h_K) * (1 + T) bytes."""
    return d * n * (6 * hq + 2 * h) * (1 + t)


def paper_fsa_flops(n: int, d: int, hq: int, h: int, bs: int, t: int) -> float:
    """FSA total FLOPs: d * N * B_K * T * (4h + 2h_K)."""
    return d * n * bs * t * (4 * hq + 2 * h)


def paper_nsa_bytes(n: int, d: int, hq: int, h: int, bs: int, t: int) -> float:
    """NSA selected-attention memory traffic: 2 * d * h_K * N * (B_K * T + g + 8) bytes."""
    return 2 * d * h * n * (bs * t + hq // h + 8)


def paper_nsa_flops(n: int, d: int, h: int, bs: int, t: int) -> float:
    """NSA selected-attention FLOPs: 32 * d * h_K * N * B_K * T (the coefficient as printed)."""
    return 32 * d * h * n * bs * t


def paper_ratios(n: int, d: int, hq: int, h: int, bs: int, t: int) -> tuple[float, float]:
    """(FSA/NSA memory, FSA/NSA FLOPs) from the paper's formulas."""
    mem = paper_fsa_bytes(n, d, hq, h, t) / paper_nsa_bytes(n, d, hq, h, bs, t)
    flops = paper_fsa_flops(n, d, hq, h, bs, t) / paper_nsa_flops(n, d, h, bs, t)
    return mem, flops


# ---------------------------------------------------------------- exact counts
@dataclass(frozen=True)
class SelectionStats:
    """What a selection costs, summed over kv heads (expectations allowed, hence floats)."""

    num_tokens: int
    num_kv_heads: int
    block_size: int
    pairs: float  # valid (token, kv head, slot) entries
    visible_keys: float  # keys those pairs really expose to the query (causal mask applied)
    blocks_touched: float  # distinct (kv head, block) with at least one pair


@dataclass(frozen=True)
class Cost:
    flops: float  # executed by the kernel
    bytes: float  # moved to / from HBM
    useful_flops: float  # 4 * D * visible keys per query head (same for every kernel)

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(self.flops + other.flops, self.bytes + other.bytes, self.useful_flops + other.useful_flops)

    def for_pass(self, pass_name: str) -> "Cost":
        f, b = PASS_FACTORS[pass_name]
        return Cost(self.flops * f, self.bytes * b, self.useful_flops * f)


def stats_from_indices(block_indices: torch.Tensor, block_size: int,
                       cu_seqlens: Optional[torch.Tensor] = None) -> SelectionStats:
    """Exact counts of real block_indices [N, H, T] (any device; one host sync at the end)."""
    from nsa_baseline.utils.varlen import token_positions

    n, h, _ = block_indices.shape
    if cu_seqlens is None:
        cu_seqlens = torch.tensor([0, n], dtype=torch.int32, device=block_indices.device)
    pos, _ = token_positions(cu_seqlens.to(block_indices.device), n)
    idx = block_indices.long()
    valid = idx >= 0
    seen = (pos[:, None, None] - idx * block_size + 1).clamp(0, block_size)
    visible = torch.where(valid, seen, torch.zeros_like(seen))
    seq_start = torch.arange(n, device=idx.device) - pos
    block_start = seq_start[:, None, None] + idx * block_size  # packed position of the block's first key
    head = torch.arange(h, device=idx.device)[None, :, None]
    key = (head * n + block_start)[valid]
    touched = torch.zeros(h * n, dtype=torch.bool, device=idx.device)
    touched[key] = True
    return SelectionStats(n, h, block_size, float(valid.sum()), float(visible.sum()), float(touched.sum()))


def stats_uniform_random(seqlen: int, num_kv_heads: int, block_size: int, topk: int,
                         batch: int = 1, init_blocks: int = 1, local_blocks: int = 2) -> SelectionStats:
    """Counts of `random_causal_block_indices` in closed form (no sampling, O(N)): a token in block c
    sees all c + 1 causal blocks when c + 1 <= T, else T of them, always including its own (partial)
    block; every block is touched by its own tokens. Pair and key counts are exact, not estimates."""
    pos = torch.arange(seqlen, dtype=torch.float64)
    own = torch.floor(pos / block_size)
    causal_blocks = own + 1
    own_keys = pos - own * block_size + 1
    few = causal_blocks <= topk
    pairs = torch.where(few, causal_blocks, torch.full_like(pos, topk))
    visible = torch.where(few, pos + 1, (topk - 1) * block_size + own_keys)
    assert init_blocks >= 0 and local_blocks >= 1, "the generator always keeps the query's own block"
    num_blocks = -(-seqlen // block_size)
    scale = batch * num_kv_heads
    return SelectionStats(seqlen * batch, num_kv_heads, block_size, float(pairs.sum()) * scale,
                          float(visible.sum()) * scale, float(num_blocks * scale))


def nsa_tile_rows(group: int) -> int:
    """Rows of NSA's query tile: the G heads of a group padded to a power of two >= 16."""
    return max(16, 1 << max(group - 1, 0).bit_length())


def useful_selected_flops(s: SelectionStats, group: int, d: int) -> float:
    return 4.0 * d * group * s.visible_keys


def nsa_cost(s: SelectionStats, group: int, d: int, elem: int = 2) -> Cost:
    """Query-outer kernel: one program per (token, kv head) loads the G query rows, then every
    selected block's K and V whole (masked afterwards), with the G tile padded to nsa_tile_rows."""
    n, h, bs = s.num_tokens, s.num_kv_heads, s.block_size
    flops = 4.0 * nsa_tile_rows(group) * bs * d * s.pairs
    bytes_ = (elem * (2.0 * bs * d * s.pairs + 2.0 * n * h * group * d)  # K, V per pair; q in, o out
              + STAT_BYTES * n * h * group + INDEX_BYTES * s.pairs)
    return Cost(flops, bytes_, useful_selected_flops(s, group, d))


def fsa_cost(s: SelectionStats, group: int, d: int, elem: int = 2) -> Cost:
    """KV-block-outer kernel: statistics kernel per kv head (K block once, q per pair, one scalar
    per pair), main kernel per query head (K, V block once, q in and partial o out per pair),
    reduction (read the partials, write o); plus the block -> query index maps."""
    n, h, bs = s.num_tokens, s.num_kv_heads, s.block_size
    hq = h * group
    stats = elem * (s.blocks_touched * bs * d + s.pairs * d) + STAT_BYTES * s.pairs
    main = elem * (group * s.blocks_touched * 2 * bs * d + group * s.pairs * 2 * d) + STAT_BYTES * s.pairs
    reduce = elem * (group * s.pairs * d + hq * n * d) + STAT_BYTES * (group * s.pairs + hq * n)
    index_maps = INDEX_BYTES * 2 * s.pairs
    flops = s.pairs * bs * d * (4.0 * group + 2.0)
    return Cost(flops, stats + main + reduce + index_maps, useful_selected_flops(s, group, d))


def dense_causal_cost(seqlen: int, batch: int, hq: int, h: int, d: int, elem: int = 2) -> Cost:
    """Full causal attention (SDPA / FlashAttention): 4 * N^2 / 2 * D * HQ FLOPs per sequence and
    one pass over q, k, v, o (the ideal of a fused kernel)."""
    flops = 4.0 * seqlen * seqlen / 2 * d * hq * batch
    n = seqlen * batch
    return Cost(flops, elem * n * d * (2.0 * hq + 2.0 * h) + STAT_BYTES * n * hq, flops)


def compressed_branch_cost(seqlen: int, batch: int, hq: int, h: int, d: int, kernel_size: int = 32,
                           stride: int = 16, elem: int = 2, q_tile: int = 128) -> Cost:
    """Attention to the compressed keys (one key per `kernel_size` window at `stride`), causal on
    the window end; compressed K/V reloaded once per q_tile queries (a flash-style estimate)."""
    pos = torch.arange(seqlen, dtype=torch.float64)
    keys = torch.clamp(torch.floor((pos + 1 - kernel_size) / stride) + 1, min=0)
    flops = 4.0 * d * hq * float(keys.sum()) * batch
    n_cmp = max(0, (seqlen - kernel_size) // stride + 1)
    reloads = -(-seqlen // q_tile)
    bytes_ = elem * batch * (2.0 * seqlen * hq * d + h * reloads * n_cmp * d)  # half the tiles are causal-skipped
    return Cost(flops, bytes_, flops)


def window_branch_cost(seqlen: int, batch: int, hq: int, h: int, d: int, window: int = 512,
                       elem: int = 2, q_tile: int = 128) -> Cost:
    """Sliding-window attention over the last `window` keys (flash-style tiling estimate)."""
    pos = torch.arange(seqlen, dtype=torch.float64)
    keys = torch.clamp(pos + 1, max=window)
    flops = 4.0 * d * hq * float(keys.sum()) * batch
    tiles = -(-seqlen // q_tile)
    bytes_ = elem * batch * (2.0 * seqlen * hq * d + h * tiles * 2.0 * (window + q_tile) * d)
    return Cost(flops, bytes_, flops)


def roofline_ms(cost: Cost, peak_tflops: float, peak_gbps: float) -> float:
    """Time of a kernel that executes `cost` at the peaks: the slower of compute and memory, every
    counted byte from HBM (no cache reuse: NSA, which rereads blocks its neighbours just loaded, is
    predicted slower than L2 lets it run)."""
    return max(cost.flops / (peak_tflops * 1e12), cost.bytes / (peak_gbps * 1e9)) * 1e3
