"""Flash Sparse Attention: KV-block-outer selected attention kernels (same contract as nsa_baseline)."""
from fsa.selected import selected_attention

__all__ = ["selected_attention"]
