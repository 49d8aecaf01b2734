"""The selected-attention families, in one registry: name -> entry point, block sizes, dtypes.

Served from here: the module's backends (nsa_baseline.backends), fsa.auto's candidates, and the
sweep's kernels. Entry points are "module:function" strings imported on first use, so importing
this registry imports neither family (fsa imports nsa_baseline, never the reverse at import time).

    from nsa_baseline.families import FAMILIES, get_family
    get_family("fsa").selected_attention(q, k, v, block_indices, 64)
    [f.name for f in FAMILIES.values() if f.candidate]     # what fsa.auto times: ["nsa", "fsa"]
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

import torch

from nsa_baseline.contract import BLOCK_SIZES, KERNEL_DTYPES


@dataclass(frozen=True)
class Family:
    """One implementation of the selected-attention contract (nsa_baseline.contract)."""

    name: str
    entry: str  # "module:function" of its selected_attention
    loop_order: str  # one line for reports
    block_sizes: tuple[int, ...] = BLOCK_SIZES
    dtypes: tuple[torch.dtype, ...] = KERNEL_DTYPES
    candidate: bool = True  # one of the kernels fsa.auto chooses between

    @property
    def selected_attention(self) -> Callable:
        module, attr = self.entry.split(":")
        return getattr(importlib.import_module(module), attr)

    def check_block_size(self, block_size, arg: str = "block_size") -> None:
        """ValueError naming `arg` unless this family's kernels take `block_size`."""
        if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size not in self.block_sizes:
            raise ValueError(f"argument `{arg}` must be one of {list(self.block_sizes)} for the {self.name!r} "
                             f"kernels, got {block_size!r}")


FAMILIES: dict[str, Family] = {
    "nsa": Family("nsa", "nsa_baseline.ops.selected:selected_attention",
                  "query-outer: one program per (token, KV head), the G heads as one padded tile"),
    "fsa": Family("fsa", "fsa.selected:selected_attention",
                  "KV-block-outer: one program per (KV head, key block, chunk of its queries)"),
    "auto": Family("auto", "fsa.auto:selected_attention",
                   "whichever candidate family is faster for the configuration (timed once)",
                   candidate=False),
}


def get_family(name: str) -> Family:
    """The registered family `name`; ValueError naming the argument otherwise."""
    if name not in FAMILIES:
        raise ValueError(f"argument `family` must be one of {sorted(FAMILIES)}, got {name!r}")
    return FAMILIES[name]


def candidates() -> dict[str, Callable]:
    """name -> selected_attention of every family fsa.auto chooses between (imports them)."""
    return {name: fam.selected_attention for name, fam in FAMILIES.items() if fam.candidate}
