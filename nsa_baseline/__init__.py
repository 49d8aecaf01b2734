"""Native Sparse Attention: the PyTorch reference, the vanilla (query-outer) Triton kernels, the module."""
from nsa_baseline.ops.selected import selected_attention  # noqa: E402,F401
