"""Inference with NativeSparseAttention: the KV cache (cache.py), the checks of a call (plan.py), one
call with a cache (step.py), the attention of new queries against the cache (cached_attention.py), the
decode step on the kernels (decode.py) and its CUDA-graph replay (graph.py: DecodeGraph)."""
from nsa_baseline.inference.cache import CacheConfig, NSACache

__all__ = ["CacheConfig", "NSACache"]
