"""Adversarial selected-attention inputs shared by the kernel tests of both families (NSA, FSA).

Each `Case` is small enough for the Triton interpreter and builds
(q, k, v, block_indices, block_size, cu_seqlens) for any dtype / device, reproducibly (own seed):

    @pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
    def test_x(case):
        q, k, v, block_indices, block_size, cu_seqlens = case.make(torch.float16, "cpu")

Index modes (`indices`):
    random      random distinct causal blocks (block 0 and the two local blocks forced), -1 where a
                token has fewer than T causal blocks;
    holes       random, then about a third of the slots set to -1 (unsorted, anywhere in the row);
    empty_rows  holes, plus rows (token, kv head) that are all -1 and tokens whose every head is -1;
    future      holes, then every -1 slot refilled where possible with a distinct block of the own
                sequence that lies wholly in the future (kernels must skip it);
    all_empty   every slot -1: o = 0, lse = -inf, all gradients zero;
    garbage     breaks the contract on purpose (`valid_indices=False`): -1 slots refilled with values
                past the sequence's blocks, huge values and values < -1. Kernels must not read out of
                bounds; they treat such slots as unused, like the reference.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from nsa_baseline.utils.indices import random_causal_block_indices
from nsa_baseline.utils.varlen import token_positions


class CaseInputs(NamedTuple):
    q: torch.Tensor  # [N, HQ, D]
    k: torch.Tensor  # [N, H, D]
    v: torch.Tensor  # [N, H, D]
    block_indices: torch.Tensor  # int32 [N, H, T]
    block_size: int
    cu_seqlens: torch.Tensor  # int32 [B + 1]


@dataclass(frozen=True)
class Case:
    name: str
    seqlens: tuple[int, ...]
    num_kv_heads: int  # H
    group: int  # G = HQ / H
    head_dim: int  # D
    topk: int  # T
    block_size: int  # BS
    indices: str = "random"
    seed: int = 0

    @property
    def num_tokens(self) -> int:
        return sum(self.seqlens)

    @property
    def valid_indices(self) -> bool:
        return self.indices != "garbage"

    @property
    def id(self) -> str:
        return (f"{self.name}-N{self.num_tokens}-B{len(self.seqlens)}-H{self.num_kv_heads}-G{self.group}"
                f"-D{self.head_dim}-T{self.topk}-BS{self.block_size}")

    def make(self, dtype: torch.dtype, device="cpu") -> CaseInputs:
        gen = torch.Generator().manual_seed(1000 + self.seed)
        n, h, g, d = self.num_tokens, self.num_kv_heads, self.group, self.head_dim
        cu = torch.tensor([0, *torch.tensor(self.seqlens).cumsum(0).tolist()], dtype=torch.int32)
        q = torch.randn(n, h * g, d, generator=gen)
        k = torch.randn(n, h, d, generator=gen)
        v = torch.randn(n, h, d, generator=gen)
        idx = make_indices(self.indices, cu, h, self.topk, self.block_size, gen)
        return CaseInputs(q.to(device, dtype), k.to(device, dtype), v.to(device, dtype), idx.to(device),
                          self.block_size, cu.to(device))


def realistic_case(n: int, h: int, g: int, d: int, t_sel: int, bs: int, seqlens=None, nsa_indices: bool = False,
                   device="cuda", dtype=torch.bfloat16) -> CaseInputs:
    """Inputs at realistic sizes for the GPU tests, built on the device from the (per-test seeded)
    global RNG: q/k/v ~ N(0, 1) and block indices from NSA's own selection on them (nsa_indices:
    many queries piled onto few blocks) or uniformly random causal ones."""
    cu = torch.tensor([0, *torch.tensor(seqlens or [n]).cumsum(0).tolist()], dtype=torch.int32, device=device)
    q = torch.randn(n, h * g, d, device=device, dtype=dtype)
    k = torch.randn(n, h, d, device=device, dtype=dtype)
    v = torch.randn(n, h, d, device=device, dtype=dtype)
    if nsa_indices:
        from nsa_baseline.reference import nsa_block_indices_ref

        idx = nsa_block_indices_ref(q, k, cu_seqlens=cu, block_size=bs, topk=t_sel)
    else:
        idx = random_causal_block_indices(n, h, t_sel, bs, cu, device=device)
    return CaseInputs(q, k, v, idx, bs, cu)


def make_indices(mode: str, cu_seqlens: torch.Tensor, h: int, t_sel: int, bs: int,
                 gen: torch.Generator) -> torch.Tensor:
    """int32 [N, H, T] block indices of the given mode (see the module docstring); CPU tensors."""
    n = int(cu_seqlens[-1])
    idx = random_causal_block_indices(n, h, t_sel, bs, cu_seqlens, generator=gen).long()
    if mode == "random":
        return idx.int()
    if mode == "all_empty":
        return torch.full_like(idx, -1).int()
    idx = torch.where(torch.rand(idx.shape, generator=gen) < 0.33, torch.full_like(idx, -1), idx)
    pos, seq_len = token_positions(cu_seqlens, n)
    if mode == "empty_rows":
        idx[torch.rand(n, h, generator=gen) < 0.25] = -1
        idx[torch.rand(n, generator=gen) < 0.1] = -1
    elif mode in ("future", "garbage"):
        nblocks = (seq_len + bs - 1) // bs
        own = pos // bs
        empty = idx < 0
        slot_rank = empty.long().cumsum(-1) - 1  # j-th empty slot of the row
        if mode == "future":
            fut = own[:, None, None] + 1 + slot_rank  # distinct blocks after the own one
            fill = torch.where(fut < nblocks[:, None, None], fut, torch.full_like(fut, -1))
        else:
            choices = torch.stack([nblocks, nblocks + 7, torch.full_like(nblocks, 2**30),
                                   torch.full_like(nblocks, 2**31 - 1), torch.full_like(nblocks, -5),
                                   torch.full_like(nblocks, -(2**31))], -1)  # [N, 6]
            pick = torch.randint(0, choices.shape[1], idx.shape, generator=gen)
            fill = choices[torch.arange(n)[:, None, None], pick]
        idx = torch.where(empty, fill, idx)
    elif mode != "holes":
        raise ValueError(f"unknown index mode {mode!r}")
    return idx.int()


CASES: list[Case] = [  # sizes kept small: the interpreter costs ~ N * H * T
    Case("single", (67,), 2, 1, 64, 3, 16),
    Case("varlen-short", (5, 40, 1, 33, 13), 2, 2, 64, 2, 32, seed=1),  # sequences under one block
    Case("odd-d96", (75,), 1, 3, 96, 4, 16, "holes", seed=2),
    Case("holes", (40, 47), 2, 5, 64, 2, 32, "holes", seed=3),
    Case("empty-rows", (45, 38), 1, 8, 64, 3, 16, "empty_rows", seed=4),
    Case("future", (50, 33), 1, 16, 64, 4, 16, "future", seed=5),
    Case("bs64", (130,), 1, 4, 64, 2, 64, seed=6),  # the own block is partly in the future
    Case("t1-d96", (70, 29), 2, 2, 96, 1, 16, "future", seed=7),
    Case("all-empty", (20, 9), 1, 2, 64, 2, 16, "all_empty", seed=8),
    Case("garbage", (40, 37), 2, 2, 64, 2, 16, "garbage", seed=9),
    Case("d192", (23, 30), 1, 2, 192, 2, 16, "holes", seed=10),  # D padded 192 -> 256
]
