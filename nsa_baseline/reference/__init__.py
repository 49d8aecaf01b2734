"""Pure PyTorch reference of all of NSA: the oracle every kernel and module is checked against."""
from nsa_baseline.reference.compressed import compressed_attention_ref, selection_scores_ref
from nsa_baseline.reference.compression import compress_kv
from nsa_baseline.reference.gating import gated_sum_ref
from nsa_baseline.reference.rope import apply_rope, rope_positions
from nsa_baseline.reference.selected import selected_attention_ref
from nsa_baseline.reference.selection import (nsa_block_indices_ref, select_blocks_from_compressed_ref,
                                             select_blocks_ref)
from nsa_baseline.reference.window import full_attention_ref, sliding_window_attention_ref
from nsa_baseline.utils.compressed_varlen import compressed_cu_seqlens, token_compressed_offsets

__all__ = [
    "apply_rope",
    "compress_kv",
    "compressed_attention_ref",
    "compressed_cu_seqlens",
    "full_attention_ref",
    "gated_sum_ref",
    "nsa_block_indices_ref",
    "rope_positions",
    "select_blocks_from_compressed_ref",
    "select_blocks_ref",
    "selected_attention_ref",
    "selection_scores_ref",
    "sliding_window_attention_ref",
    "token_compressed_offsets",
]
