"""Which implementation runs each NSA branch and the gated sum of the branches, by backend name
(looked up lazily with importlib).

    torch : every branch from nsa_baseline.reference
    nsa, fsa, auto : selected attention from that family of nsa_baseline.families; the other
            branches and the gated sum from nsa_baseline.branches (the GPU kernels where they serve
            the call, the reference elsewhere)

The selected branch of a non-torch backend is required (an ImportError-free fallback would make a
benchmark silently time the reference); every other branch falls back to the reference and is
listed in `Backend.fallbacks`.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable

from nsa_baseline.families import FAMILIES

# Branch -> "module:function" of the reference implementation.
REFERENCE = {
    "compress_kv": "nsa_baseline.reference.compression:compress_kv",
    "compressed_attention": "nsa_baseline.reference.compressed:compressed_attention_ref",
    "select_blocks_from_compressed": "nsa_baseline.reference.selection:select_blocks_from_compressed_ref",
    "nsa_block_indices": "nsa_baseline.reference.selection:nsa_block_indices_ref",
    "selected_attention": "nsa_baseline.reference.selected:selected_attention_ref",
    "sliding_window_attention": "nsa_baseline.reference.window:sliding_window_attention_ref",
    "gated_sum": "nsa_baseline.reference.gating:gated_sum_ref",
}
# The other branches of a kernel backend: GPU kernels with the reference as fallback.
_BRANCHES = {name: (f"nsa_baseline.branches:{name}",) for name in (
    "compress_kv", "compressed_attention", "select_blocks_from_compressed", "nsa_block_indices",
    "sliding_window_attention", "gated_sum")}

# Backend -> branch -> candidate "module:function" names, first found wins; branches missing here
# use the reference.
BACKENDS: dict[str, dict[str, tuple[str, ...]]] = {
    "torch": {},
    **{name: {**_BRANCHES, "selected_attention": (fam.entry,)} for name, fam in FAMILIES.items()},
}
REQUIRED = ("selected_attention",)


@dataclass
class Backend:
    """The resolved functions of one backend; `fallbacks` names the branches served by the reference."""

    name: str
    functions: dict[str, Callable] = field(default_factory=dict)
    fallbacks: tuple[str, ...] = ()

    def __getattr__(self, branch: str) -> Callable:
        try:
            return self.__dict__["functions"][branch]
        except KeyError:
            raise AttributeError(branch) from None


def _load(target: str):
    """The object named by "module:function", or None when the module or attribute does not exist."""
    module_name, attr = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name is not None and module_name.startswith(err.name):
            return None  # the module itself (or its package) is missing, not one of its imports
        raise
    return getattr(module, attr, None)


def resolve_backend(name: str) -> Backend:
    """Look up every branch of backend `name`; ValueError for an unknown name, ImportError when a
    required branch (the selected attention) is not available."""
    if name not in BACKENDS:
        raise ValueError(f"argument `backend` must be one of {sorted(BACKENDS)}, got {name!r}")
    functions, fallbacks = {}, []
    for branch, ref in REFERENCE.items():
        targets = BACKENDS[name].get(branch, ())
        fn = next((f for f in map(_load, targets) if f is not None), None)
        if fn is None:
            if targets and branch in REQUIRED:
                raise ImportError(f"backend {name!r}: none of {list(targets)} is available")
            if targets:
                fallbacks.append(branch)
            fn = _load(ref)
        functions[branch] = fn
    return Backend(name, functions, tuple(fallbacks))
