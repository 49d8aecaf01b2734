"""Block selection of NSA in Triton: selection scores from the compressed softmax, and top-T, fused.

Grid (query tiles of BLOCK_Q tokens, H); the tile's rows are its (token, query head) pairs of one KV
group. Per sequence met by the tile it loops over selection-block tiles (BJ blocks = BJ * R summaries,
R = BS / stride): p = exp2(q . k_cmp * scale * log2e - lse * log2e) on the visible summaries, summed
over the G heads and mapped to blocks by overlap (a summary gives min(C, R - u) to its own block and
max(0, u + C - R) to the next one, u = its slot in the block, C = kernel_size / stride), the spill
carried across tiles. With COMPUTE_LSE the kernel first runs an online logsumexp over the same
summaries (the selection path needs no compressed-attention output). With TOPK > 0 it keeps each
row's running top-T set while the block scores are made (a candidate above the set's minimum replaces
it; forced blocks rank +inf) and writes only the int32 indices: no [N, H, NB] scores in memory, whose
torch.topk dominated the selection (results/module_profile/README.md).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from nsa_baseline.ops.tuning import selection_config
from nsa_baseline.utils.triton_utils import LOG2E, is_interpreter, new_output, next_pow2


@triton.jit
def _qk(b_q, b_k, IEEE: tl.constexpr):
    """[BM, BLOCK_D] x [BC, BLOCK_D]^T -> fp32 [BM, BC]; exact fp32 products for fp32 inputs."""
    if IEEE:
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision="ieee")
    else:
        b_s = tl.dot(b_q, tl.trans(b_k))
    return b_s


@triton.jit
def _lse_tile(b_q, b_mx, b_l, p_k, i0, nvis_max, nvis_m, in_m, qk_scale,
              H: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BC: tl.constexpr,
              IEEE: tl.constexpr):
    """Online logsumexp (base 2) of rows b_q over the visible summaries [i0, i0 + BC)."""
    o_c = tl.arange(0, BC)
    o_d = tl.arange(0, BLOCK_D)
    b_k = tl.load(p_k + i0 * (H * D), mask=((i0 + o_c) < nvis_max)[:, None] & (o_d < D)[None, :],
                  other=0.)  # [BC, BLOCK_D]
    b_s = _qk(b_q, b_k, IEEE) * qk_scale  # [BM, BC]
    vis = in_m[:, None] & ((i0 + o_c)[None, :] < nvis_m[:, None])
    b_s = tl.where(vis, b_s, float("-inf"))
    b_mx_new = tl.maximum(b_mx, tl.max(b_s, axis=1))
    b_ref = tl.where(b_mx_new == float("-inf"), 0., b_mx_new)  # rows that saw nothing yet stay 0
    b_l = b_l * tl.exp2(b_mx - b_ref) + tl.sum(tl.exp2(b_s - b_ref[:, None]), axis=1)
    return b_mx_new, b_l


@triton.jit
def _scores_tile(b_q, b_lse, carry, p_k, j0, nvis_max, nvis_m, in_m, qk_scale,
                 H: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_Q: tl.constexpr,
                 G_PAD: tl.constexpr, BJ: tl.constexpr, R: tl.constexpr, C: tl.constexpr,
                 IEEE: tl.constexpr):
    """Scores [BLOCK_Q, BJ] of blocks [j0, j0 + BJ) for the tile's tokens of one sequence, and the
    spill of the last block's summaries into block j0 + BJ."""
    BC: tl.constexpr = BJ * R
    o_j = tl.arange(0, BJ)
    b_acc = tl.where(o_j[None, :] == 0, carry[:, None], 0.)  # [BLOCK_Q, BJ]
    carry = tl.zeros([BLOCK_Q], dtype=tl.float32)
    i0 = j0 * R
    if i0 < nvis_max:
        o_c = tl.arange(0, BC)
        o_d = tl.arange(0, BLOCK_D)
        o_u = tl.arange(0, R)
        b_k = tl.load(p_k + i0 * (H * D), mask=((i0 + o_c) < nvis_max)[:, None] & (o_d < D)[None, :],
                      other=0.)  # [BC, BLOCK_D]
        b_s = _qk(b_q, b_k, IEEE) * qk_scale  # [BM, BC]
        vis = in_m[:, None] & ((i0 + o_c)[None, :] < nvis_m[:, None])
        b_p = tl.where(vis, tl.exp2(b_s - b_lse[:, None]), 0.)
        b_pg = tl.sum(tl.reshape(b_p, (BLOCK_Q, G_PAD, BJ, R)), axis=1)  # [BLOCK_Q, BJ, R]: G summed
        w_same = tl.minimum(C, R - o_u).to(tl.float32)  # [R] sub-blocks a summary shares with its block
        w_next = tl.maximum(o_u + C - R, 0).to(tl.float32)  # [R] ... and with the next block
        b_same = tl.sum(b_pg * w_same[None, None, :], axis=2)  # [BLOCK_Q, BJ]
        b_next = tl.sum(b_pg * w_next[None, None, :], axis=2)  # [BLOCK_Q, BJ], belongs to block j + 1
        prev_j = tl.broadcast_to(tl.maximum(o_j - 1, 0)[None, :], (BLOCK_Q, BJ))
        b_shift = tl.gather(b_next, prev_j, axis=1)  # b_next[:, j - 1]
        b_acc += b_same + tl.where(o_j[None, :] == 0, 0., b_shift)
        carry = tl.sum(tl.where(o_j[None, :] == BJ - 1, b_next, 0.), axis=1)
    return b_acc, carry


@triton.jit
def _merge_top(vals, ids, b_sc, j0, cur_t, in_t, INIT: tl.constexpr, LOCAL: tl.constexpr,
               BJ: tl.constexpr, T_PAD: tl.constexpr, FILL_FIRST: tl.constexpr, WHILE_LOOP: tl.constexpr):
    """Insert the candidates of blocks [j0, j0 + BJ) (scores b_sc [BLOCK_Q, BJ]) into each row's running
    top set (vals, ids [BLOCK_Q, T_PAD]): each step, a row's best remaining candidate replaces the
    set's minimum if it is larger. Steps = the most candidates above a row's minimum at entry (one
    block-wide reduction per tile, none per step). Rank as nsa_baseline.utils.topk.select_chunk: forced
    blocks +inf, other causal blocks by score (NaN -> lowest finite), non-causal blocks are no candidates."""
    FMAX: tl.constexpr = 3.4028234663852886e38
    o_j = tl.arange(0, BJ)
    o_s = tl.arange(0, T_PAD)
    o_b = j0 + o_j
    causal = in_t[:, None] & (o_b[None, :] <= cur_t[:, None])
    forced = causal & ((o_b[None, :] < INIT) | (o_b[None, :] > cur_t[:, None] - LOCAL))
    cand = tl.where(b_sc != b_sc, -FMAX, tl.minimum(tl.maximum(b_sc, -FMAX), FMAX))
    cand = tl.where(forced, float("inf"), tl.where(causal, cand, float("-inf")))
    if FILL_FIRST and j0 == 0:  # T == T_PAD == BJ: the first tile is the set (rows of this sequence)
        vals = tl.where(in_t[:, None], cand, vals)
        ids = tl.where(in_t[:, None], o_b[None, :] + tl.zeros_like(ids), ids)
    else:
        thr = tl.min(vals, axis=1)
        steps = tl.max(tl.sum((cand > thr[:, None]).to(tl.int32), axis=1), axis=0)
        if WHILE_LOOP:  # the interpreter cannot range() over computed bounds
            step = steps * 0
            while step < steps:
                vals, ids, cand = _insert_best(vals, ids, cand, j0, o_j, o_s)
                step += 1
        else:
            for _ in range(steps):
                vals, ids, cand = _insert_best(vals, ids, cand, j0, o_j, o_s)
    return vals, ids


@triton.jit
def _insert_best(vals, ids, cand, j0, o_j, o_s):
    best, pick = tl.max(cand, axis=1, return_indices=True)  # leftmost best: lower block first on ties
    low, slot = tl.min(vals, axis=1, return_indices=True)
    hit = (best > low)[:, None] & (o_s[None, :] == slot[:, None])
    vals = tl.where(hit, best[:, None], vals)
    ids = tl.where(hit, (j0 + pick)[:, None], ids)
    cand = tl.where(o_j[None, :] == pick[:, None], float("-inf"), cand)
    return vals, ids, cand


@triton.jit
def _pack_desc(vals, ids, ID_BITS: tl.constexpr = 0):
    """Keys whose descending order is (score descending, block id ascending). ID_BITS == 0: int64, the
    float's bits made integer-ordered in the high word, 0x7FFFFFFF - id in the low word (exact).
    ID_BITS > 0: int32, the ordered bits with their low ID_BITS replaced by (2^ID_BITS - 1 - id), for ids
    below 2^ID_BITS: half the width through the sorting network, scores ranked to 23 - ID_BITS
    mantissa bits (equal truncated scores go to the lower block, as exact ties do)."""
    bits = vals.to(tl.int32, bitcast=True)
    key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    if ID_BITS > 0:
        MASK: tl.constexpr = (1 << ID_BITS) - 1
        return (key & ~MASK) | ((MASK - ids) & MASK)
    else:
        return (key.to(tl.int64) << 32) | ((0x7FFFFFFF - ids).to(tl.int64) & 0xFFFFFFFF)


@triton.jit
def _rank_packed(b_sc, o_b, cur_t, in_t, INIT: tl.constexpr, LOCAL: tl.constexpr, ID_BITS: tl.constexpr = 0):
    """Packed rank keys (_pack_desc) of blocks o_b [BJ] with scores b_sc [BLOCK_Q, BJ]: forced blocks
    (the first INIT, the LOCAL ending at the row's block cur_t) +inf, other causal blocks their score
    (NaN -> lowest finite), later blocks and rows outside in_t -inf. Same rank as _merge_top."""
    FMAX: tl.constexpr = 3.4028234663852886e38
    causal = in_t[:, None] & (o_b[None, :] <= cur_t[:, None])
    forced = causal & ((o_b[None, :] < INIT) | (o_b[None, :] > cur_t[:, None] - LOCAL))
    cand = tl.where(b_sc != b_sc, -FMAX, tl.minimum(tl.maximum(b_sc, -FMAX), FMAX))
    cand = tl.where(forced, float("inf"), tl.where(causal, cand, float("-inf")))
    return _pack_desc(cand, o_b[None, :] + tl.zeros_like(cand).to(tl.int32), ID_BITS)


@triton.jit
def _merge_packed(keys, cand_p, BJ: tl.constexpr, T_PAD: tl.constexpr):
    """Merge candidate keys cand_p [BLOCK_Q, BJ] into each row's set `keys` ([BLOCK_Q, T_PAD], sorted
    descending) with a fixed sorting network instead of per-candidate insertion: the candidates' best
    T_PAD ascending against the set descending, the elementwise maximum holds the union's top T_PAD as
    a bitonic sequence, one bitonic merge sorts it. Skipped when no row has a candidate above its
    set's lowest entry."""
    beats = tl.max(cand_p, axis=1) > tl.min(keys, axis=1)
    if tl.max(beats.to(tl.int32), axis=0) > 0:
        if BJ == T_PAD:
            low_first = tl.sort(cand_p, dim=1, descending=False)
        else:
            low_first = tl.flip(tl.topk(cand_p, T_PAD, dim=1), 1)
        keys = tl.bitonic_merge(tl.maximum(keys, low_first), 1, True)
    return keys


@triton.jit
def _merge_bitonic(keys, b_sc, j0, cur_t, in_t, INIT: tl.constexpr, LOCAL: tl.constexpr,
                   BJ: tl.constexpr, T_PAD: tl.constexpr, ID_BITS: tl.constexpr = 0):
    """Merge the candidates of blocks [j0, j0 + BJ) (scores b_sc) into each row's sorted set `keys`
    (_rank_packed then _merge_packed). Same rank as _merge_top."""
    cand_p = _rank_packed(b_sc, j0 + tl.arange(0, BJ), cur_t, in_t, INIT, LOCAL, ID_BITS)
    return _merge_packed(keys, cand_p, BJ, T_PAD)


@triton.jit
def _store_sorted(keys, p_idx, m_t, T: tl.constexpr, T_PAD: tl.constexpr, ID_BITS: tl.constexpr = 0):
    """Write the first T entries of each row's sorted set `keys` (_pack_desc with ID_BITS; forced blocks
    rank +inf, so they come first, then decreasing score); -1 for entries that are still -inf (no block)."""
    o_s = tl.arange(0, T_PAD)
    tl.store(p_idx[:, None] + o_s[None, :], _key_ids(keys, ID_BITS), mask=m_t[:, None] & (o_s < T)[None, :])


@triton.jit
def _key_ids(keys, ID_BITS: tl.constexpr = 0):
    """The block ids of packed keys (_pack_desc with ID_BITS), int32; -1 where the key is still -inf."""
    NEG_INF_KEY: tl.constexpr = -2139095041  # the ordered bits of -inf (0xFF800000 ^ 0x7FFFFFFF)
    if ID_BITS > 0:
        MASK: tl.constexpr = (1 << ID_BITS) - 1
        ids = MASK - (keys & MASK)
        empty = (keys & ~MASK) == (NEG_INF_KEY & ~MASK)
    else:
        ids = (0x7FFFFFFF - (keys & 0xFFFFFFFF)).to(tl.int32)
        empty = (keys >> 32).to(tl.int32) == NEG_INF_KEY
    return tl.where(empty, -1, ids)


@triton.jit
def _store_top(vals, ids, p_idx, m_t, T: tl.constexpr, T_PAD: tl.constexpr):
    """Write each row's set as select_chunk orders it: forced first, then by decreasing score, -1 for
    empty slots (slots >= T hold +inf placeholders and are dropped)."""
    o_s = tl.arange(0, T_PAD)
    bits = vals.to(tl.int32, bitcast=True)
    key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # integer order = float order
    key = tl.where(o_s[None, :] < T, key, -2147483648)  # placeholders last
    packed = (key.to(tl.int64) << 32) | (tl.where(vals > float("-inf"), ids, -1).to(tl.int64) & 0xFFFFFFFF)
    packed = tl.sort(packed, dim=1, descending=True)
    b_idx = (packed & 0xFFFFFFFF).to(tl.int32)
    tl.store(p_idx[:, None] + o_s[None, :], b_idx, mask=m_t[:, None] & (o_s < T)[None, :])


@triton.jit
def _block_tile(b_q, b_lse, carry, vals, ids, p_k, out_ptr, j0, row0, tok_t, cur_t, nb_t, in_t, nvis_max, nvis_m,
                in_m, NB, qk_scale, H: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_Q: tl.constexpr,
                G_PAD: tl.constexpr, BJ: tl.constexpr, R: tl.constexpr, C: tl.constexpr, IEEE: tl.constexpr,
                TOPK: tl.constexpr, T_PAD: tl.constexpr, INIT: tl.constexpr, LOCAL: tl.constexpr,
                WHILE_LOOP: tl.constexpr, BITONIC: tl.constexpr, ID_BITS: tl.constexpr):
    """Scores of blocks [j0, j0 + BJ): merged into the running top sets (TOPK > 0) or stored."""
    b_sc, carry = _scores_tile(b_q, b_lse, carry, p_k, j0, nvis_max, nvis_m, in_m, qk_scale,
                               H, D, BLOCK_D, BLOCK_Q, G_PAD, BJ, R, C, IEEE)
    if TOPK > 0 and BITONIC:
        vals = _merge_bitonic(vals, b_sc, j0, cur_t, in_t, INIT, LOCAL, BJ, T_PAD, ID_BITS)
    elif TOPK > 0:
        vals, ids = _merge_top(vals, ids, b_sc, j0, cur_t, in_t, INIT, LOCAL, BJ, T_PAD,
                               (TOPK == T_PAD) and (BJ == T_PAD), WHILE_LOOP)
    else:
        o_b = j0 + tl.arange(0, BJ)
        b_out = tl.where(o_b[None, :] < nb_t[:, None], b_sc, float("-inf"))
        p_out = out_ptr + ((tok_t - row0).to(tl.int64) * H + tl.program_id(1)) * NB
        tl.store(p_out[:, None] + o_b[None, :], b_out, mask=in_t[:, None] & (o_b < NB)[None, :])
    return carry, vals, ids


@triton.jit
def _selection_scores_kernel(
    q_ptr, k_ptr, lse_ptr, out_ptr, cu_ptr, cu_cmp_ptr, tok_seq_ptr,
    row0, n_rows, N, NB, qk_scale,
    HQ: tl.constexpr, H: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_Q: tl.constexpr, BJ: tl.constexpr,
    R: tl.constexpr, C: tl.constexpr, KS: tl.constexpr, STRIDE: tl.constexpr, BS: tl.constexpr,
    COMPUTE_LSE: tl.constexpr, IEEE: tl.constexpr, WHILE_LOOP: tl.constexpr,
    TOPK: tl.constexpr, T_PAD: tl.constexpr, INIT: tl.constexpr, LOCAL: tl.constexpr,
    BITONIC: tl.constexpr, ID_BITS: tl.constexpr,
):
    """TOPK == 0: write the scores float32 [n_rows, H, NB]. TOPK > 0: keep each row's top TOPK blocks
    while the scores are made and write int32 [n_rows, H, TOPK] block indices (no scores in memory)."""
    tl.static_assert(C <= R)
    i_q, i_h = tl.program_id(0), tl.program_id(1)
    BM: tl.constexpr = BLOCK_Q * G_PAD
    BC: tl.constexpr = BJ * R
    t0 = row0 + i_q * BLOCK_Q
    t_end = row0 + n_rows
    # rows of the tile: (token, head g of group i_h), token-major
    o_m = tl.arange(0, BM)
    tok_m = t0 + o_m // G_PAD
    g_m = o_m % G_PAD
    m_m = (tok_m < t_end) & (g_m < G)
    seq_m = tl.load(tok_seq_ptr + tok_m, mask=m_m, other=-1)
    pos_m = tok_m - tl.load(cu_ptr + seq_m, mask=m_m, other=0)
    nvis_m = tl.where(pos_m >= KS - 1, (pos_m - (KS - 1)) // STRIDE + 1, 0)  # visible summaries
    o_d = tl.arange(0, BLOCK_D)
    p_q = q_ptr + tok_m.to(tl.int64)[:, None] * (HQ * D) + (i_h * G + g_m)[:, None] * D + o_d[None, :]
    b_q = tl.load(p_q, mask=m_m[:, None] & (o_d < D)[None, :], other=0.)  # [BM, BLOCK_D]
    if COMPUTE_LSE:
        b_lse = tl.zeros([BM], dtype=tl.float32)
    else:
        b_lse = tl.load(lse_ptr + (i_h * G + g_m).to(tl.int64) * N + tok_m, mask=m_m, other=0.) * 1.4426950408889634
    # tokens of the tile (output rows)
    o_t = tl.arange(0, BLOCK_Q)
    tok_t = t0 + o_t
    m_t = tok_t < t_end
    seq_t = tl.load(tok_seq_ptr + tok_t, mask=m_t, other=0)
    start_t = tl.load(cu_ptr + seq_t, mask=m_t, other=0)
    len_t = tl.load(cu_ptr + seq_t + 1, mask=m_t, other=0) - start_t
    nb_t = (len_t + BS - 1) // BS  # blocks of the token's sequence; later ones are -inf
    cur_t = (tok_t - start_t) // BS  # the token's own block
    # running top set of every row (TOPK == 0: unused); slots >= TOPK hold +inf placeholders
    o_s = tl.arange(0, T_PAD)
    ids = tl.zeros([BLOCK_Q, T_PAD], dtype=tl.int32) - 1
    if BITONIC:  # packed keys, all empty (-inf); the first T of the sorted set are stored
        vals = _pack_desc(tl.full([BLOCK_Q, T_PAD], float("-inf"), tl.float32), ids, ID_BITS)
    else:
        vals = tl.where(o_s[None, :] < TOPK, float("-inf"), float("inf")) + tl.zeros([BLOCK_Q, T_PAD], tl.float32)

    s = tl.min(tl.where(m_t, seq_t, 2147483647), axis=0)  # sequences met by the tile: s .. s_last
    s_last = tl.max(tl.where(m_t, seq_t, -1), axis=0)
    while s <= s_last:
        in_m = m_m & (seq_m == s)
        in_t = m_t & (seq_t == s)
        p_k = k_ptr + (tl.load(cu_cmp_ptr + s).to(tl.int64) + tl.arange(0, BC)[:, None]) * (H * D) + i_h * D + o_d[None, :]
        nvis_max = tl.max(tl.where(in_m, nvis_m, 0), axis=0)
        if COMPUTE_LSE:
            b_mx = tl.full([BM], float("-inf"), dtype=tl.float32)
            b_l = tl.zeros([BM], dtype=tl.float32)
            if WHILE_LOOP:  # the interpreter cannot range() over loaded bounds
                i0 = nvis_max * 0
                while i0 < nvis_max:
                    b_mx, b_l = _lse_tile(b_q, b_mx, b_l, p_k, i0, nvis_max, nvis_m, in_m, qk_scale,
                                          H, D, BLOCK_D, BC, IEEE)
                    i0 += BC
            else:
                for i0 in range(0, nvis_max, BC):
                    b_mx, b_l = _lse_tile(b_q, b_mx, b_l, p_k, i0, nvis_max, nvis_m, in_m, qk_scale,
                                          H, D, BLOCK_D, BC, IEEE)
            b_lse = tl.where(in_m, tl.where(b_l > 0, b_mx + tl.log2(tl.where(b_l > 0, b_l, 1.)), float("-inf")), b_lse)
        carry = tl.zeros([BLOCK_Q], dtype=tl.float32)  # mass spilled into the first block of a tile
        # top-T needs the causal blocks only; the scores output is written in full
        if TOPK > 0:
            j_end = tl.max(tl.where(in_t, cur_t, -1), axis=0) + 1
        else:
            j_end = NB
        if WHILE_LOOP:
            j0 = j_end * 0
            while j0 < j_end:
                carry, vals, ids = _block_tile(b_q, b_lse, carry, vals, ids, p_k, out_ptr, j0, row0, tok_t, cur_t,
                                               nb_t, in_t, nvis_max, nvis_m, in_m, NB, qk_scale, H, D, BLOCK_D,
                                               BLOCK_Q, G_PAD, BJ, R, C, IEEE, TOPK, T_PAD, INIT, LOCAL,
                                               WHILE_LOOP, BITONIC, ID_BITS)
                j0 += BJ
        else:
            for j0 in range(0, j_end, BJ):
                carry, vals, ids = _block_tile(b_q, b_lse, carry, vals, ids, p_k, out_ptr, j0, row0, tok_t, cur_t,
                                               nb_t, in_t, nvis_max, nvis_m, in_m, NB, qk_scale, H, D, BLOCK_D,
                                               BLOCK_Q, G_PAD, BJ, R, C, IEEE, TOPK, T_PAD, INIT, LOCAL,
                                               WHILE_LOOP, BITONIC, ID_BITS)
        s += 1
    if TOPK > 0 and BITONIC:
        _store_sorted(vals, out_ptr + ((tok_t - row0).to(tl.int64) * H + i_h) * TOPK, m_t, TOPK, T_PAD, ID_BITS)
    elif TOPK > 0:
        _store_top(vals, ids, out_ptr + ((tok_t - row0).to(tl.int64) * H + i_h) * TOPK, m_t, TOPK, T_PAD)


KEY32_ID_BITS = 12  # block ids a 32-bit key holds (4096 blocks: 256K tokens of 64-token blocks)


def key_id_bits(keys, num_blocks: int) -> int:
    """_pack_desc's ID_BITS for SELECTION_CONFIG["keys"] (64 or 32): 0 = exact int64 keys. 32-bit
    keys need every block id below 2^KEY32_ID_BITS."""
    if keys not in (64, 32):
        raise ValueError(f"SELECTION_CONFIG['keys'] must be 64 or 32, got {keys!r}")
    if keys == 32 and num_blocks > 1 << KEY32_ID_BITS:
        raise ValueError(f"32-bit selection keys hold block ids below {1 << KEY32_ID_BITS}; "
                         f"num_blocks={num_blocks} needs keys=64")
    return KEY32_ID_BITS if keys == 32 else 0


def _tile_sizes(g: int, r: int, d: int, rows: int = 64, summaries: int = 64):
    """(G_PAD, BLOCK_Q, BJ, BLOCK_D): BLOCK_Q tokens x G_PAD heads = max(rows, G_PAD) rows per dot,
    BJ blocks x R summaries = max(summaries, R) summaries per tile."""
    g_pad = next_pow2(g)
    return g_pad, max(1, rows // g_pad), max(1, summaries // r), next_pow2(max(d, 16))


def selection_scores_fwd(q, k_cmp, lse, cu, cu_cmp, tok_seq, row0, n_rows, num_blocks, scale,
                         kernel_size, kernel_stride, block_size, out=None, config=None,
                         topk=0, init_blocks=0, local_blocks=0):
    """Launch the scores kernel for query rows [row0, row0 + n_rows); lse=None computes it in-kernel.
    topk == 0: returns the scores float32 [n_rows, H, num_blocks]; topk > 0: the selected blocks
    int32 [n_rows, H, topk] (select_chunk's rule and slot order), the scores never stored.
    `config` overrides entries of nsa_baseline.ops.tuning.SELECTION_CONFIG."""
    n, hq, d = q.shape
    h = k_cmp.shape[1]
    g = hq // h
    cfg = selection_config(config)
    r, c = block_size // kernel_stride, kernel_size // kernel_stride
    g_pad, block_q, bj, block_d = _tile_sizes(g, r, d, cfg["rows"], cfg["summaries"])
    if out is None:
        shape, dtype = ((n_rows, h, topk), torch.int32) if topk else ((n_rows, h, num_blocks), torch.float32)
        out = new_output(shape, dtype, q.device)
    if n_rows == 0 or (num_blocks == 0 and not topk):
        return out
    k_cmp = k_cmp.to(q.dtype).contiguous()
    if k_cmp.shape[0] == 0:  # no summary anywhere: keep a valid pointer, nothing is visible
        k_cmp = q.new_zeros(1, h, d)
    t_pad = next_pow2(max(topk, 1))
    bitonic = bool(topk) and cfg["merge"] == "bitonic" and bj >= t_pad  # the network needs a full tile
    id_bits = key_id_bits(cfg["keys"], num_blocks) if bitonic else 0
    grid = (triton.cdiv(n_rows, block_q), h)
    _selection_scores_kernel[grid](
        q.contiguous(), k_cmp, lse if lse is not None else out, out, cu, cu_cmp, tok_seq,
        row0, n_rows, n, num_blocks, scale * LOG2E,
        HQ=hq, H=h, G=g, G_PAD=g_pad, D=d, BLOCK_D=block_d, BLOCK_Q=block_q, BJ=bj, R=r, C=c,
        KS=kernel_size, STRIDE=kernel_stride, BS=block_size, COMPUTE_LSE=lse is None,
        IEEE=q.dtype == torch.float32, WHILE_LOOP=is_interpreter(),
        TOPK=topk, T_PAD=t_pad, INIT=init_blocks, LOCAL=local_blocks, BITONIC=bitonic,
        ID_BITS=id_bits,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return out
