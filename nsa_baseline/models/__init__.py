"""NSA inside Hugging Face transformers decoders (the optional `models` extra): use_nsa_attention
swaps every self-attention of a Llama / Qwen2 / Qwen3 model for NSAAttention; generate runs the
swapped model with NSA's KV cache. No module here imports transformers: they work on the model
objects handed to them."""
from nsa_baseline.models.attention import NSAAttention
from nsa_baseline.models.swap import use_nsa_attention
from nsa_baseline.models.generate import GenerationCache, generate
from nsa_baseline.models.graph import GenerationGraph

__all__ = ["GenerationCache", "GenerationGraph", "NSAAttention", "generate", "use_nsa_attention"]
