"""Where the sequences of a Hugging Face batch start: cu_seqlens from `position_ids` (positions restart
at every packed sequence, the convention of transformers' DataCollatorWithFlattening) or from
`cu_seq_lens_q`, and the restarting positions for a given cu_seqlens.

A batch [B, S] is read as B * S packed tokens; a row never continues into the next one.
"""
from __future__ import annotations

from typing import Optional

import torch

from nsa_baseline.checks import check_cu_seqlens, fail
from nsa_baseline.utils.varlen import token_positions


def cu_seqlens_from_position_ids(position_ids: Optional[torch.Tensor], batch: int, seqlen: int,
                                 device) -> Optional[torch.Tensor]:
    r"""int32 [num_seqs + 1] over the B * S flattened tokens, or None for a single sequence.

    A sequence starts at every row start and wherever a position is not its predecessor + 1
    (transformers' own rule for packed batches, masking_utils.find_packed_sequence_indices).
    Without position_ids every row is one sequence. Reads the starts to the host (one sync).
    """
    if position_ids is None:
        if batch == 1:
            return None
        return torch.arange(0, (batch + 1) * seqlen, seqlen, dtype=torch.int32, device=device)
    if not isinstance(position_ids, torch.Tensor) or position_ids.dim() != 2 or \
            position_ids.shape[0] not in (1, batch) or position_ids.shape[1] != seqlen:
        fail("position_ids", f"must be [B={batch} (or 1), S={seqlen}], got {tuple(getattr(position_ids, 'shape', ()))}")
    pos = position_ids.to(device).expand(batch, seqlen)
    starts = torch.ones_like(pos, dtype=torch.bool)
    starts[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1  # [B, S]
    first = starts.flatten().nonzero().flatten()
    if first.numel() == 1:
        return None
    end = torch.tensor([batch * seqlen], device=device, dtype=first.dtype)
    return torch.cat([first, end]).to(torch.int32)


def check_packed_cu_seqlens(cu_seqlens: torch.Tensor, num_tokens: int, name: str = "cu_seq_lens_q") -> torch.Tensor:
    """`cu_seqlens` as int32 on its device after the value checks (starts at 0, non-decreasing, ends
    at num_tokens); ValueError naming `name` otherwise."""
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or \
            cu_seqlens.dtype not in (torch.int32, torch.int64):
        fail(name, f"must be an int32/int64 tensor [B + 1] with B >= 1, got {getattr(cu_seqlens, 'dtype', None)} "
                   f"of shape {tuple(getattr(cu_seqlens, 'shape', ()))}")
    cu_seqlens = cu_seqlens.to(torch.int32)
    check_cu_seqlens(cu_seqlens, num_tokens, name=name)
    return cu_seqlens


def positions_from_cu_seqlens(cu_seqlens: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """int64 [1, N]: every token's position inside its own sequence (the position_ids HF's RoPE needs)."""
    return token_positions(cu_seqlens, num_tokens)[0].to(torch.int64)[None]
