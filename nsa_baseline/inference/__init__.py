"""Inference with NativeSparseAttention: the KV cache (cache.py), the checks of a call (plan.py), one
call with a cache (step.py) and the attention of new queries against the cache (cached_attention.py)."""
from nsa_baseline.inference.cache import CacheConfig, NSACache

__all__ = ["CacheConfig", "NSACache"]
