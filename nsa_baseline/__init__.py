"""Native Sparse Attention: the PyTorch reference, the vanilla (query-outer) Triton kernels, the module."""
import importlib

from nsa_baseline.ops.selected import selected_attention

__all__ = ["selected_attention"]
_SUBMODULES = ("backends", "branches", "checks", "contract", "families", "module", "ops", "reference", "utils")


def __getattr__(name: str):
    # `nsa_baseline.reference.nsa_block_indices_ref` etc. work after `import nsa_baseline` alone, while
    # importing the package loads no more than the kernels (the reference stays out of sys.modules).
    if name in _SUBMODULES:
        return importlib.import_module(f"nsa_baseline.{name}")
    raise AttributeError(f"module 'nsa_baseline' has no attribute {name!r}")
