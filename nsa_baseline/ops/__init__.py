"""NSA on the GPU: the vanilla (query-outer) selected-attention Triton kernels and the other branches
(compression, compressed attention + block selection, sliding window / full attention). Fast paths
only: a call they do not serve raises a ValueError naming `q`; nsa_baseline.branches falls back to
the reference instead."""
from nsa_baseline.ops.compressed import compressed_attention
from nsa_baseline.ops.compression import compress_kv
from nsa_baseline.ops.selected import selected_attention
from nsa_baseline.ops.selection import (
    nsa_block_indices,
    select_blocks,
    select_blocks_from_compressed,
    selection_scores,
)
from nsa_baseline.ops.window import full_attention, sliding_window_attention

__all__ = [
    "compress_kv",
    "compressed_attention",
    "full_attention",
    "nsa_block_indices",
    "select_blocks",
    "select_blocks_from_compressed",
    "selected_attention",
    "selection_scores",
    "sliding_window_attention",
]
