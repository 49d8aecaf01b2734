"""NSA inside Hugging Face transformers decoders (the optional `models` extra): use_nsa_attention
swaps every self-attention of a Llama / Qwen2 / Qwen3 model for NSAAttention. Neither module imports
transformers: they work on the model objects handed to them."""
from nsa_baseline.models.attention import NSAAttention
from nsa_baseline.models.swap import use_nsa_attention

__all__ = ["NSAAttention", "use_nsa_attention"]
