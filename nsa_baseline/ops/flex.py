"""FlexAttention helpers shared by the NSA branches that run on it (compressed, sliding-window and
full attention): the compiled kernel, cached block masks, per-query band masks, packed layouts.

Every mask here is a per-query band: key kv is visible to query q iff lo[q] <= kv < hi[q], with
analytic bounds for one sequence and two [N] lookup tables for packed sequences. On CUDA the block
mask is built without materialising [Q, KV]; eager FlexAttention elsewhere (CPU) materialises the
whole score matrix and has no backward, so it serves tests of the masks only.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from nsa_baseline.checks import fail

FLEX_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MASK_CACHE: dict[tuple, object] = {}
_MASK_CACHE_SIZE = 32
_compiled_flex = None


def compiled_flex():
    """flex_attention compiled once per process (the CUDA path; other devices run it eagerly)."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    if _compiled_flex is None:
        import torch._dynamo

        # One compiled graph per (lengths, heads, dtype): a sweep over sizes must not fall back to the
        # unfused eager path (which materialises [HQ, N, L] scores) after 8 recompiles.
        cfg = torch._dynamo.config
        for name, value in (("recompile_limit", 256), ("accumulated_recompile_limit", 4096)):
            legacy = name.replace("recompile", "cache_size")
            name = name if hasattr(cfg, name) else legacy
            if hasattr(cfg, name):
                setattr(cfg, name, max(getattr(cfg, name), value))
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex


def tensor_key(t: Optional[torch.Tensor]) -> tuple:
    """Identity of a (cu_seqlens) tensor for caches: object id, storage, in-place version, size."""
    if t is None:
        return (None,)
    return (id(t), t.data_ptr(), t._version, t.numel(), str(t.device))


def cached_block_mask(key: tuple, build: Callable[[], tuple[Callable, int, int]], device,
                      keep: Optional[torch.Tensor] = None):
    """BlockMask for `key`, built by `build() -> (mask_mod, Q_LEN, KV_LEN)` on a miss.

    On CUDA the mask is built with `create_block_mask(_compile=True)` (no [Q, KV] tensor is ever
    materialised); the cache holds the last few masks so repeated layers / steps reuse them. `keep`
    (the cu_seqlens tensor of the key) is held with the mask so that its id is not reused meanwhile.
    """
    from torch.nn.attention.flex_attention import create_block_mask

    hit = _MASK_CACHE.get(key)
    mask = None if hit is None else hit[1]
    if mask is None:
        mask_mod, q_len, kv_len = build()
        mask = create_block_mask(mask_mod, None, None, q_len, kv_len, device=device,
                                 _compile=torch.device(device).type == "cuda")
        if len(_MASK_CACHE) >= _MASK_CACHE_SIZE:
            _MASK_CACHE.pop(next(iter(_MASK_CACHE)))
        _MASK_CACHE[key] = (keep, mask)
    return mask


def band_mask_mod(lo: torch.Tensor, hi: torch.Tensor):
    """mask_mod of a per-query band: kv visible to q iff lo[q] <= kv < hi[q] (int32 [N] tables)."""
    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx >= lo[q_idx]) & (kv_idx < hi[q_idx])
    return mask_mod


def flex_attention_packed(q, k, v, block_mask, scale: float, return_lse: bool):
    """FlexAttention over packed [N, HQ, D] / [L, H, D] tensors viewed as one batch of [1, heads, N, D].

    Returns o [N, HQ, D] (and lse float32 [HQ, N] in natural log: the kernels keep base-2 statistics
    and flex_attention rescales them by ln 2 before returning, as read in torch 2.13's source and
    checked against the reference on torch 2.11 by experiments/gpu/branches_check.py). Rows that see
    nothing give o = 0, lse = -inf (and zero gradients).
    """
    hq, h = q.shape[1], k.shape[1]
    qf, kf, vf = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))  # [1, heads, len, D] views
    fn = compiled_flex() if q.is_cuda else _eager_flex()
    if return_lse:
        try:  # torch >= 2.9: return_aux; return_lse is deprecated there
            from torch.nn.attention.flex_attention import AuxRequest
        except ImportError:
            o, lse = fn(qf, kf, vf, block_mask=block_mask, scale=scale, enable_gqa=hq != h, return_lse=True)
        else:
            o, aux = fn(qf, kf, vf, block_mask=block_mask, scale=scale, enable_gqa=hq != h,
                        return_aux=AuxRequest(lse=True))
            lse = aux.lse
        return o[0].transpose(0, 1).contiguous(), lse[0].float()
    o = fn(qf, kf, vf, block_mask=block_mask, scale=scale, enable_gqa=hq != h)
    return o[0].transpose(0, 1).contiguous()


def _eager_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return flex_attention


def use_flex(q: torch.Tensor) -> bool:
    """Whether the compiled FlexAttention path serves q (CUDA, fp16 / bf16 / fp32)."""
    return q.is_cuda and q.dtype in FLEX_DTYPES


def require_flex(q: torch.Tensor, fallback: str) -> None:
    """ValueError naming `q` unless use_flex(q); `fallback` names the function that runs anywhere."""
    if not use_flex(q):
        fail("q", f"must be a CUDA tensor of {[str(t) for t in FLEX_DTYPES]} for FlexAttention, got {q.dtype} "
             f"on {q.device}; {fallback} falls back to the reference elsewhere")
