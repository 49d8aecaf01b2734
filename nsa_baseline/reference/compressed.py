"""Compressed-branch attention of NSA and the selection scores derived from it, in plain PyTorch.

Loops over chunks of queries; a chunk reads only the packed summaries of the sequences it touches,
so the score tensor is [chunk, HQ, max summaries per sequence + chunk] at most (chunks are
checkpointed under autograd, see window.attend_chunk).
Summary i of a sequence is visible to its query at position t iff i * stride + kernel_size - 1 <= t:
the visible summaries of a query are the first `visible_compressed(t)` of its own sequence.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import torch.nn.functional as F

from nsa_baseline.checks import check_block_mapping, check_compressed_args
from nsa_baseline.reference.window import attend_chunk, compute_dtype
from nsa_baseline.utils.compressed_varlen import token_compressed_offsets, visible_compressed
from nsa_baseline.utils.varlen import sequence_lengths, token_positions

# Elements of one chunk's score tensor ([chunk, HQ, summaries]).
_SCORE_BUDGET = 1 << 26
_MAX_CHUNK = 1024


@dataclass
class CompressedLayout:
    """Per-token view of the packed summaries: where its sequence's summaries start, how many it sees."""

    pos: torch.Tensor  # int64 [N] position inside the sequence
    seq_len: torch.Tensor  # int64 [N] length of the token's sequence
    cmp_start: torch.Tensor  # int64 [N] packed index of the sequence's first summary
    n_visible: torch.Tensor  # int64 [N] summaries the token sees
    max_len: int  # longest sequence
    max_cmp: int  # most summaries of one sequence

    def chunks(self, num_q_heads: int) -> Iterator[tuple[int, int, int, int]]:
        """(c0, c1, lo, hi): query rows [c0, c1) see only packed summaries [lo, hi)."""
        n = self.pos.numel()
        chunk = max(1, min(_MAX_CHUNK, _SCORE_BUDGET // (num_q_heads * (self.max_cmp + _MAX_CHUNK))))
        end = self.cmp_start + self.n_visible  # non-decreasing over packed tokens
        for c0 in range(0, n, chunk):
            c1 = min(n, c0 + chunk)
            yield c0, c1, int(self.cmp_start[c0]), int(end[c1 - 1])

    def visible(self, c0: int, c1: int, lo: int, hi: int) -> torch.Tensor:
        """bool [c1 - c0, hi - lo]: which summaries of the range each query of the chunk sees."""
        j = torch.arange(lo, hi, device=self.pos.device)[None, :]
        start = self.cmp_start[c0:c1, None]
        return (j >= start) & (j < start + self.n_visible[c0:c1, None])


def compressed_layout(cu_seqlens: torch.Tensor, cu_seqlens_cmp: torch.Tensor, num_tokens: int,
                      kernel_size: int, kernel_stride: int) -> CompressedLayout:
    pos, seq_len = token_positions(cu_seqlens, num_tokens)
    lens = sequence_lengths(cu_seqlens)
    n_cmp = sequence_lengths(cu_seqlens_cmp)
    return CompressedLayout(pos, seq_len, token_compressed_offsets(cu_seqlens, cu_seqlens_cmp, num_tokens),
                            visible_compressed(pos, kernel_size, kernel_stride),
                            int(lens.max()) if lens.numel() else 0, int(n_cmp.max()) if n_cmp.numel() else 0)


def compressed_attention_ref(
    q: torch.Tensor,
    k_cmp: torch.Tensor,
    v_cmp: torch.Tensor,
    cu_seqlens: Optional[torch.Tensor],
    cu_seqlens_cmp: Optional[torch.Tensor],
    kernel_size: int = 32,
    kernel_stride: int = 16,
    scale: Optional[float] = None,
):
    r"""Causal attention of every query over its sequence's compressed keys.

    Args:
        q: [N, HQ, D]; k_cmp, v_cmp: [N_cmp, H, D] from compress_kv; HQ = G * H and query head hq
            uses kv head hq // G.
        cu_seqlens: int32 [B + 1] of the tokens; cu_seqlens_cmp: int32 [B + 1] of the summaries
            (None for both = one sequence). kernel_size, kernel_stride: as given to compress_kv.
        scale: defaults to D ** -0.5.
    Returns:
        o [N, HQ, D] in q.dtype and lse float32 [HQ, N]. A query that sees no summary yet
        (position < kernel_size - 1) gets o = 0, lse = -inf and a zero gradient.
    """
    cu_seqlens, cu_seqlens_cmp, scale = check_compressed_args(
        q, k_cmp, cu_seqlens, cu_seqlens_cmp, kernel_size, kernel_stride, scale, v_cmp)
    n, hq, _ = q.shape
    layout = compressed_layout(cu_seqlens, cu_seqlens_cmp, n, kernel_size, kernel_stride)
    compute = compute_dtype(q.dtype)
    qc, kc, vc = q.to(compute), k_cmp.to(compute), v_cmp.to(compute)
    outs, lses = [], []
    for c0, c1, lo, hi in layout.chunks(hq):
        o, lse = attend_chunk(qc[c0:c1], kc[lo:hi], vc[lo:hi], layout.visible(c0, c1, lo, hi), scale)
        outs.append(o)
        lses.append(lse)
    return torch.cat(outs).to(q.dtype), torch.cat(lses).float().t().contiguous()


def summaries_to_blocks(p: torch.Tensor, kernel_size: int, kernel_stride: int, block_size: int,
                        num_blocks: int) -> torch.Tensor:
    r"""Map per-summary probabilities to selection blocks by overlap (see selection_scores_ref).

    Args:
        p: [..., S] mass of each summary of a sequence (summary i in slot i; zero past the last one).
    Returns:
        [..., num_blocks]: block j gets sum_{m < BS/stride} sum_{n < kernel_size/stride}
        p[(BS/stride) * j + m - n], i.e. each summary counts once per stride-sized sub-block it
        shares with block j.
    """
    k_sub, r_sub = kernel_size // kernel_stride, block_size // kernel_stride
    # sub[u] = sum_n p[u - n]: mass on stride-sized sub-block u (summary i covers sub-blocks i .. i+K-1).
    sub = sum(F.pad(p, (n, k_sub - 1 - n)) for n in range(k_sub))  # [..., S + K - 1]
    width = num_blocks * r_sub
    sub = F.pad(sub, (0, width - sub.shape[-1])) if sub.shape[-1] < width else sub[..., :width]
    return sub.reshape(*p.shape[:-1], num_blocks, r_sub).sum(-1)


def chunk_selection_scores(qc, kc, lse, layout: CompressedLayout, c0, c1, lo, hi, scale,
                           kernel_size, kernel_stride, block_size, num_blocks):
    r"""Selection scores of query rows [c0, c1) (no autograd).

    Args:
        qc: [N, HQ, D]; kc: [N_cmp, H, D] (compute dtype); lse: [c, HQ] of these rows, or None to
        compute it from the same logits.
    Returns:
        float32 [c, H, num_blocks], -inf for blocks past the end of the query's sequence.
    """
    c, hq, d = qc[c0:c1].shape
    h = kc.shape[1]
    device = qc.device
    visible = layout.visible(c0, c1, lo, hi)  # [c, L]
    s = torch.einsum("chgd,lhd->chgl", qc[c0:c1].view(c, h, hq // h, d), kc[lo:hi]) * scale
    if lse is None:
        lse = torch.logsumexp(s.masked_fill(~visible[:, None, None, :], float("-inf")), dim=-1)
    else:
        lse = lse.to(s.dtype).view(c, h, hq // h)
    p = torch.where(visible[:, None, None, :], torch.exp(s - lse[..., None]), torch.zeros_like(s))
    p = p.sum(dim=2)  # [c, H, L]: summed over the G query heads of each kv head
    # Re-index to summary slots of the query's own sequence: slot i = packed summary cmp_start + i.
    width = max(1, int(layout.n_visible[c0:c1].max()))
    slot = torch.arange(width, device=device)
    col = (layout.cmp_start[c0:c1, None] - lo + slot).clamp(0, max(hi - lo - 1, 0))  # [c, S]
    if hi > lo:
        p_loc = p.gather(-1, col[:, None, :].expand(c, h, width))
    else:
        p_loc = p.new_zeros(c, h, width)
    p_loc = p_loc * (slot < layout.n_visible[c0:c1, None])[:, None, :]
    scores = summaries_to_blocks(p_loc, kernel_size, kernel_stride, block_size, num_blocks).float()
    n_blocks = (layout.seq_len[c0:c1] + block_size - 1) // block_size  # [c]
    missing = torch.arange(num_blocks, device=device)[None, :] >= n_blocks[:, None]
    return scores.masked_fill(missing[:, None, :], float("-inf"))


@torch.no_grad()
def selection_scores_ref(
    q: torch.Tensor,
    k_cmp: torch.Tensor,
    lse: torch.Tensor,
    cu_seqlens: Optional[torch.Tensor],
    cu_seqlens_cmp: Optional[torch.Tensor],
    kernel_size: int,
    kernel_stride: int,
    block_size: int,
    scale: Optional[float] = None,
) -> torch.Tensor:
    r"""Importance of every selection block for every query, from the compressed attention (NSA eq. 9).

    p_cmp = exp(q . k_cmp * scale - lse) are the compressed branch's softmax probabilities. They are
    mapped to selection blocks by
        p_slc[j] = sum_{m=0}^{BS/stride-1} sum_{n=0}^{kernel_size/stride-1} p_cmp[(BS/stride) * j + m - n]
    (summary indices out of range are skipped), then summed over the G query heads of each kv head.
    The paper prints the index as (BS/stride) * j - m - n; we read it in this "overlap" form
    because summary i covers the stride-sized sub-blocks i .. i + kernel_size/stride - 1 and block j
    covers sub-blocks (BS/stride) * j .. (BS/stride) * (j + 1) - 1, so the (m, n) pairs with
    i = (BS/stride) * j + m - n count exactly the sub-blocks that summary i shares with block j:
    every summary gives its mass to the blocks holding its keys. The printed "- m - n" would give
    block j the mass of summaries lying before it (block 0 would get only summary 0's mass, once).

    Args:
        q: [N, HQ, D]; k_cmp: [N_cmp, H, D]; lse: float32 [HQ, N] from compressed_attention_ref.
        cu_seqlens, cu_seqlens_cmp: int32 [B + 1] (None for both = one sequence).
        kernel_size, kernel_stride, block_size: need stride | kernel_size, stride | BS, kernel_size <= BS.
        scale: defaults to D ** -0.5.
    Returns:
        scores float32 [N, H, NB] with NB = ceil(max_seqlen / BS). Blocks past the end of the
        query's own sequence are -inf; blocks after the query's own block score 0 (they hold no
        visible summary); no gradient flows through the scores.
    """
    check_block_mapping(kernel_size, kernel_stride, block_size)
    cu_seqlens, cu_seqlens_cmp, scale = check_compressed_args(
        q, k_cmp, cu_seqlens, cu_seqlens_cmp, kernel_size, kernel_stride, scale)
    n, hq, _ = q.shape
    if not isinstance(lse, torch.Tensor) or tuple(lse.shape) != (hq, n):
        raise ValueError(f"argument `lse` must be [HQ={hq}, N={n}], got {getattr(lse, 'shape', lse)!r}")
    layout = compressed_layout(cu_seqlens, cu_seqlens_cmp, n, kernel_size, kernel_stride)
    num_blocks = (layout.max_len + block_size - 1) // block_size
    compute = compute_dtype(q.dtype)
    qc, kc, lse_t = q.to(compute), k_cmp.to(compute), lse.t()
    out = [chunk_selection_scores(qc, kc, lse_t[c0:c1], layout, c0, c1, lo, hi, scale,
                                  kernel_size, kernel_stride, block_size, num_blocks)
           for c0, c1, lo, hi in layout.chunks(hq)]
    return torch.cat(out)
