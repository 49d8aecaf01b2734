"""Flash Sparse Attention: KV-block-outer selected attention kernels (same contract as nsa_baseline)."""
from fsa import auto
from fsa.selected import selected_attention

__all__ = ["auto", "selected_attention"]
