"""Sliding-window and full causal attention (NSA's window branch and the dense baseline), forward and
backward, through PyTorch's fused attention kernels.

CUDA: `torch.compile(flex_attention)` with a block mask built once per (lengths, cu_seqlens tensor,
window) and cached, GQA through enable_gqa; full causal attention over one sequence without lse
goes to `scaled_dot_product_attention(is_causal=True, enable_gqa=True)` instead.
Every mask here is a per-query band: key kv is visible to query q iff lo[q] <= kv < hi[q], with
analytic bounds for one sequence and two [N] lookup tables for packed sequences.
CPU (and float64): falls back to nsa_baseline.reference (eager FlexAttention on CPU materialises the
whole score matrix and has no backward); `flex_attention_packed` still runs there for tests.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from nsa_baseline.reference.window import full_attention_ref, sliding_window_attention_ref
from nsa_baseline.utils.varlen import token_positions

FLEX_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MASK_CACHE: dict[tuple, object] = {}
_MASK_CACHE_SIZE = 32
_compiled_flex = None


def _flex():
    """flex_attention compiled once per process (the CUDA path; CPU uses `_eager_flex`)."""
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
    fn = _flex() if q.is_cuda else _eager_flex()
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


def check_qkv(q, k, v, cu_seqlens, scale) -> float:
    """Shape / dtype / scale checks of a window or full attention call (no device work); returns scale."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3 or not t.is_floating_point():
            raise ValueError(f"argument `{name}` must be a floating tensor [N, heads, D]")
    n, hq, d = q.shape
    if k.shape[0] != n or k.shape[2] != d or tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"arguments `k`, `v` must both be [N={n}, H, D={d}], got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[1] < 1 or hq % k.shape[1] != 0:
        raise ValueError(f"argument `q`: num_q_heads={hq} must be a multiple of num_kv_heads={k.shape[1]}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"arguments `k`, `v` must have q's dtype {q.dtype}, got {k.dtype} and {v.dtype}")
    if cu_seqlens is not None and (not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dtype != torch.int32
                                   or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2):
        raise ValueError("argument `cu_seqlens` must be an int32 tensor [B + 1] or None")
    if scale is not None and not (isinstance(scale, (int, float)) and scale > 0):
        raise ValueError(f"argument `scale` must be a positive float or None, got {scale!r}")
    return d ** -0.5 if scale is None else float(scale)


def _use_flex(q: torch.Tensor) -> bool:
    return q.is_cuda and q.dtype in FLEX_DTYPES


def band_block_mask(n: int, cu_seqlens: Optional[torch.Tensor], window: Optional[int], device):
    """Causal (window=None) or sliding-window block mask over n packed tokens, cached."""
    key = ("band", n, window, tensor_key(cu_seqlens), str(device))

    def build():
        if cu_seqlens is None or cu_seqlens.numel() == 2:
            if window is None:
                return (lambda b, h, q_idx, kv_idx: kv_idx <= q_idx), n, n
            return (lambda b, h, q_idx, kv_idx: (kv_idx <= q_idx) & (q_idx - kv_idx < window)), n, n
        cu = cu_seqlens.to(device)
        pos, _ = token_positions(cu, n)
        rows = torch.arange(n, device=device)
        lo = rows - pos if window is None else torch.maximum(rows - pos, rows - window + 1)
        return band_mask_mod(lo.int(), (rows + 1).int()), n, n

    return cached_block_mask(key, build, device, keep=cu_seqlens)


def sliding_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window_size: int,
    cu_seqlens: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    return_lse: bool = False,
):
    r"""Causal sliding-window attention: key s is visible to query t iff t - window_size < s <= t
    inside the same sequence (NSA's window branch). Differentiable w.r.t. q, k, v.

    CUDA (fp16/bf16/fp32): compiled FlexAttention with a cached sliding-window block mask.
    CPU or float64: `sliding_window_attention_ref`.

    Args:
        q: [N, HQ, D]; k, v: [N, H, D]; HQ = G * H, query head hq uses kv head hq // G.
        window_size: positive int. cu_seqlens: int32 [B + 1] or None. scale: defaults to D ** -0.5.
    Returns:
        o [N, HQ, D] in q.dtype, and with return_lse the float32 lse [HQ, N] (natural log).
    """
    if not _use_flex(q):
        return sliding_window_attention_ref(q, k, v, window_size, cu_seqlens, scale, return_lse)
    if not isinstance(window_size, int) or isinstance(window_size, bool) or window_size < 1:
        raise ValueError(f"argument `window_size` must be a positive int, got {window_size!r}")
    scale = check_qkv(q, k, v, cu_seqlens, scale)
    mask = band_block_mask(q.shape[0], cu_seqlens, window_size, q.device)
    return flex_attention_packed(q, k, v, mask, scale, return_lse)


def full_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    return_lse: bool = False,
):
    r"""Full causal attention inside each sequence (the dense baseline). Differentiable.

    CUDA: one sequence without lse -> `scaled_dot_product_attention(is_causal=True, enable_gqa=True)`
    (FlashAttention; fp32 with G > 1 excepted); packed sequences or return_lse -> compiled
    FlexAttention with a cached causal document mask. CPU or float64: `full_attention_ref`.

    Args:
        q: [N, HQ, D]; k, v: [N, H, D]; HQ = G * H. cu_seqlens: int32 [B + 1] or None.
        scale: defaults to D ** -0.5.
    Returns:
        o [N, HQ, D] in q.dtype, and with return_lse the float32 lse [HQ, N] (natural log).
    """
    if not _use_flex(q):
        return full_attention_ref(q, k, v, cu_seqlens, scale, return_lse)
    scale = check_qkv(q, k, v, cu_seqlens, scale)
    single = cu_seqlens is None or cu_seqlens.numel() == 2
    # enable_gqa is honoured by the flash backend only (fp16/bf16, D <= 256); anything else would
    # fall to the O(N^2)-memory math backend, so it goes through FlexAttention instead.
    gqa = q.shape[1] != k.shape[1]
    flash_ok = q.dtype in (torch.float16, torch.bfloat16) and q.shape[2] <= 256 and \
        torch.backends.cuda.flash_sdp_enabled()
    if single and not return_lse and (flash_ok or not gqa):
        qf, kf, vf = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
        o = F.scaled_dot_product_attention(qf, kf, vf, is_causal=True, scale=scale, enable_gqa=gqa)
        return o[0].transpose(0, 1).contiguous()
    mask = band_block_mask(q.shape[0], cu_seqlens, None, q.device)
    return flex_attention_packed(q, k, v, mask, scale, return_lse)
