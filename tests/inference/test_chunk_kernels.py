"""Chunked prefill's compressed branch and selection through the prefill kernels
(nsa_baseline/inference/chunk.py): the cache's slots as the kernels' sequences, every new token at its
absolute position. CPU interpreter, fp32; the PyTorch path is the oracle."""
import torch

import nsa_baseline.inference.chunk as chunk
import nsa_baseline.inference.decode as decode
from nsa_baseline.inference.step import forward_with_cache
from tests.helpers import assert_close
from tests.inference.schedules import packed
from tests.inference.test_decode_kernels import small_module


def test_chunks_through_the_prefill_kernels_equal_the_pytorch_path(monkeypatch):
    """Chunks of 9 to 40 tokens over 3 slots (one with no new tokens, one with no history yet), g = 3,
    a paged cache: outputs equal the PyTorch path's, and every call with history went through
    chunk_compressed_select (its minimum lowered to 8 tokens for these sizes)."""
    monkeypatch.setattr(chunk, "CHUNK_KERNEL_MIN_TOKENS", 8)
    calls = []
    real = decode.chunk_compressed_select
    monkeypatch.setattr(decode, "chunk_compressed_select",
                        lambda module, q, *a: (calls.append(q.shape[0]), real(module, q, *a))[1])
    m = small_module(3)
    fast, slow = m.new_cache(3, 112, page_size=16), m.new_cache(3, 112, page_size=16)
    for counts in ([20, 7, 0], [33, 0, 9], [1, 30, 12]):
        x = torch.randn(sum(counts), 32)
        y = forward_with_cache(m, x, packed(counts), fast)
        y_torch = forward_with_cache(m, x, packed(counts), slow, decode_kernels=False)
        assert_close(y, y_torch, torch.float32, f"counts {counts}: prefill kernels vs PyTorch path")
    assert fast.host_lengths == slow.host_lengths == (54, 37, 21)
    assert calls == [42, 43]  # the first call is a prefill (no history): the module's forward
