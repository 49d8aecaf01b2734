"""Native Sparse Attention: the PyTorch reference, the vanilla (query-outer) Triton kernels, the module."""
