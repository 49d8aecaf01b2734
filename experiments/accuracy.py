"""rel_err of a kernel's forward output, computed once per point: ||o - ref|| / ||ref|| in float32
over `ref_rows` sampled query rows (and the last row, which sees all T blocks), so that the check
stays cheap at 256K tokens. Selected attention is checked against the selection it was given,
dense attention against softmax over all causal keys, the module against backend="torch"."""
from __future__ import annotations

import math

import torch

from experiments.inputs import Inputs
from experiments.points import Point

MODULE_REFERENCE_MAX_TOKENS = 16384  # the torch module reference is run up to this many tokens
# rel_err a measured row may show, by dtype: about 4x what the kernels reach against their references
# (bf16 ~0.0025-0.004). A row above it is listed in summary.md: a precision defect (22ebcaa's bf16
# double rounding read 0.02 in fig4) should not sit silently in a results table.
REL_ERR_LIMIT = {"bfloat16": 1e-2, "float16": 5e-3, "float32": 1e-3}
DENSE_REFERENCE_ROWS = 32  # dense rows see up to N keys each: fewer of them
GATHER_BUDGET = 1 << 25  # float32 elements of gathered keys per step (128 MiB)


def sample_rows(num_tokens: int, count: int, seed: int, device) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randperm(num_tokens, generator=gen)[: max(count - 1, 0)]
    return torch.cat([rows, torch.tensor([num_tokens - 1])]).unique().to(device)


def _attend(q_rows, keys, values, visible, scale):
    """q_rows [R, H, G, D], keys/values [R, H, L, D], visible [R, H, L] -> [R, H * G, D] float32."""
    s = torch.einsum("rhgd,rhld->rhgl", q_rows, keys) * scale
    s = s.masked_fill(~visible[:, :, None, :], float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    o = torch.einsum("rhgl,rhld->rhgd", p, values)
    return o.flatten(1, 2)


def selected_rows_ref(inp: Inputs, point: Point, rows: torch.Tensor) -> torch.Tensor:
    from nsa_baseline.reference.selected import selected_key_positions

    per_row = point.kv_heads * point.topk * point.block_size * point.head_dim
    chunk = max(1, GATHER_BUDGET // per_row)
    heads = torch.arange(point.kv_heads, device=rows.device)[None, :, None]
    outs = []
    for part in rows.split(chunk):
        pos = part % point.seqlen
        key_pos, visible = selected_key_positions(inp.block_indices[part], point.block_size, pos)
        packed = (part - pos)[:, None, None] + key_pos.clamp(0, point.seqlen - 1)  # [R, H, L]
        kk, vv = inp.k[packed, heads].float(), inp.v[packed, heads].float()
        qq = inp.q[part].float().view(len(part), point.kv_heads, point.gqa, point.head_dim)
        outs.append(_attend(qq, kk, vv, visible, point.head_dim ** -0.5))
    return torch.cat(outs)


def dense_rows_ref(inp: Inputs, point: Point, rows: torch.Tensor) -> torch.Tensor:
    """Softmax over every causal key of the row's sequence, a few kv heads at a time."""
    outs = []
    for r in rows.tolist():
        start = r - r % point.seqlen
        keys = r + 1 - start
        step = max(1, GATHER_BUDGET // (keys * point.head_dim))
        parts = []
        for h0 in range(0, point.kv_heads, step):
            h1 = min(point.kv_heads, h0 + step)
            kk = inp.k[start:r + 1, h0:h1].float().transpose(0, 1)[None]  # [1, h, L, D]
            vv = inp.v[start:r + 1, h0:h1].float().transpose(0, 1)[None]
            qq = inp.q[r].float().view(point.kv_heads, point.gqa, point.head_dim)[None, h0:h1]
            visible = torch.ones(1, h1 - h0, keys, dtype=torch.bool, device=kk.device)
            parts.append(_attend(qq, kk, vv, visible, point.head_dim ** -0.5))
        outs.append(torch.cat(parts, dim=1))
    return torch.cat(outs)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out = out.float()
    denom = ref.norm().item()
    return (out - ref).norm().item() / denom if denom > 0 else math.nan


def output_rel_err(family: str, out: torch.Tensor, inp: Inputs, point: Point, ref_rows: int, seed: int,
                   module_ref=None) -> tuple[float, str]:
    """(rel_err, note); the note says when no reference was run."""
    if family == "peer":
        return math.nan, "another variant of NSA (fla-core's parallel_nsa): no shared reference"
    if family == "module":
        if point.num_tokens > MODULE_REFERENCE_MAX_TOKENS or module_ref is None:
            return math.nan, f"module reference skipped above {MODULE_REFERENCE_MAX_TOKENS} tokens"
        with torch.no_grad():
            return relative_error(out, module_ref().float()), ""
    if family == "selected":
        rows = sample_rows(point.num_tokens, ref_rows, seed, out.device)
        ref = selected_rows_ref(inp, point, rows)
    else:
        rows = sample_rows(point.num_tokens, min(ref_rows, DENSE_REFERENCE_ROWS), seed, out.device)
        ref = dense_rows_ref(inp, point, rows)
    return relative_error(out[rows], ref), ""


def over_limit(rows):
    """The measured rows whose rel_err exceeds REL_ERR_LIMIT for their dtype (NaN: no reference run)."""
    limit = rows["dtype"].astype(str).map(REL_ERR_LIMIT)
    return rows[rows["rel_err"].astype(float) > limit]
