"""Pure PyTorch reference of all of NSA: the oracle every kernel and module is checked against."""
from nsa_baseline.reference.selected import selected_attention_ref

__all__ = ["selected_attention_ref"]
