"""Triton kernels of Native Sparse Attention (vanilla, query-outer)."""
from nsa_baseline.ops.selected import selected_attention

__all__ = ["selected_attention"]
