"""GenerationGraph: the whole swapped model's decode step as one CUDA graph.

CPU (interpreter, fp32, one layer): capture=False runs the body the graph records (positions read
from the device lengths, static input buffers) and steps exactly like the eager decode of `generate`;
bad calls name the argument and write nothing. GPU (bf16, two layers, Llama heads g = 4): replays equal
the eager steps, generate(cuda_graph=True) picks the same tokens, and the graph survives clear()."""
import copy

import pytest
import torch

from tests.helpers import assert_close
from tests.models.tiny_models import KERNEL, VOCAB, tiny_model, transformers

from nsa_baseline.backends import resolve_backend  # noqa: E402
from nsa_baseline.models import GenerationCache, GenerationGraph, generate, use_nsa_attention  # noqa: E402


def kernel_model(layers: int = 1):
    try:
        resolve_backend("fsa")
    except ImportError as err:
        pytest.skip(str(err))
    model = use_nsa_attention(tiny_model("llama"), backend="fsa", **KERNEL)
    model.model.layers = model.model.layers[:layers]
    model.config.num_hidden_layers = layers
    return model


def prefill(model, cache, prompts):
    """The prompts packed into the cache's slots; the logits of each prompt's last token [B, vocab]."""
    dev = next(model.parameters()).device
    plan = cache.begin([len(p) for p in prompts], dev)
    last = torch.tensor([len(p) for p in prompts], device=dev).cumsum(0) - 1
    with torch.no_grad():
        return model(torch.cat(prompts)[None], position_ids=plan.pos[None], nsa_cache=cache,
                     logits_to_keep=last).logits[0]


def eager_step(model, cache, tokens):
    plan = cache.begin([1] * len(tokens), tokens.device)
    with torch.no_grad():
        return model(tokens[None], position_ids=plan.pos[None], nsa_cache=cache).logits[0]


def test_graph_body_steps_like_the_eager_decode():
    """Prompts 14 and 3 + 5 steps: summaries complete, block 16 is crossed, the window slides; the
    graph's cache paged (pages of 16 rows: slot 0 claims its second page mid-way), the eager one
    contiguous (the paged cache's own tests cover both layouts on the kernels)."""
    model = kernel_model()
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, VOCAB, (n,), generator=g) for n in (14, 3)]
    tokens = torch.randint(0, VOCAB, (5, 2), generator=g)
    caches = [GenerationCache(model, 2, 24), GenerationCache(model, 2, 24, page_size=16)]
    for c in caches:
        prefill(model, c, prompts)
    graph = GenerationGraph(model, caches[1], capture=False)
    for t in tokens:
        ref = eager_step(model, caches[0], t)
        out = graph.step(t)
        assert_close(out, ref, torch.float32, "graph body vs eager step logits")
        assert caches[1].host_lengths == caches[0].host_lengths
        assert torch.equal(caches[1].first.lengths, caches[0].first.lengths)
    for a, b in zip(caches[0].caches(), caches[1].caches()):
        for name in ("k_cmp", "v_cmp", "lengths"):
            assert torch.equal(a.tensors()[name], b.tensors()[name]), name
        for slot, n in enumerate(a.host_lengths):
            at = b.rows(torch.full((n,), slot), torch.arange(n))
            assert torch.equal(a.k[slot, :n], b.k[at]) and torch.equal(a.v[slot, :n], b.v[at])
    caches[1].reset(0)
    assert caches[1].host_lengths[0] == 0 and caches[1].first.free_pages == 3  # of 4 pages: slot 0's 2 back


def test_bad_calls_name_the_argument_and_write_nothing():
    model = kernel_model()
    cache = GenerationCache(model, 2, 6)
    with pytest.raises(ValueError, match="`cache`.*at least one token"):
        GenerationGraph(model, cache, capture=False)
    prefill(model, cache, [torch.tensor([1, 2, 3, 4, 5]), torch.tensor([1])])
    with pytest.raises(ValueError, match="`cache`.*CUDA"):
        GenerationGraph(model, cache)
    graph = GenerationGraph(model, cache, capture=False)
    before = {k: t.clone() for k, t in cache.first.tensors().items()}
    for bad in (torch.tensor([1, 2, 3]), torch.tensor([1.0, 2.0]), torch.tensor([[1, 2]])):
        with pytest.raises(ValueError, match="`tokens`"):
            graph.step(bad)
    graph.step(torch.tensor([3, 4]))  # slot 0 reaches max_seqlen 6
    after = {k: t.clone() for k, t in cache.first.tensors().items()}
    with pytest.raises(ValueError, match="`cache`.*full slot"):
        graph.step(torch.tensor([3, 4]))
    assert all(torch.equal(t, cache.first.tensors()[k]) for k, t in after.items())
    assert not all(torch.equal(t, after[k]) for k, t in before.items())  # the good step did write
    torch_model = use_nsa_attention(tiny_model("llama"), backend="torch", **KERNEL)
    cache = GenerationCache(torch_model, 1, 8)
    prefill(torch_model, cache, [torch.tensor([1, 2])])
    with pytest.raises(ValueError, match="`model`.*decode kernels"):
        GenerationGraph(torch_model, cache, capture=False)
    with pytest.raises(ValueError, match="`cuda_graph`"):
        generate(model, [[1, 2]], 3, cuda_graph=True)


@pytest.mark.gpu
def test_replayed_steps_equal_eager_steps_and_generate():
    """bf16 on CUDA, two layers, Llama heads (32 / 8 scaled down to 8 / 2, d = 64), the (64, 16)
    preset's kernels at small sizes; prompts of 300 and 77 tokens and 40 steps."""
    try:
        resolve_backend("fsa")
    except ImportError as err:
        pytest.skip(str(err))
    config = transformers.LlamaConfig(vocab_size=512, hidden_size=512, intermediate_size=1024, num_hidden_layers=2,
                                      num_attention_heads=8, num_key_value_heads=2, head_dim=64,
                                      max_position_embeddings=4096, use_cache=False)
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(config).eval()
    preset = dict(kernel_size=32, kernel_stride=16, block_size=64, topk=4, window_size=128)
    model = use_nsa_attention(base, backend="fsa", **preset).to("cuda", torch.bfloat16)
    g = torch.Generator("cuda").manual_seed(1)
    prompts = [torch.randint(0, 512, (n,), device="cuda", generator=g) for n in (300, 77)]
    tokens = torch.randint(0, 512, (40, 2), device="cuda", generator=g)
    caches = [GenerationCache(model, 2, 400) for _ in range(2)]
    for c in caches:
        prefill(model, c, prompts)
    graph = GenerationGraph(model, caches[1])
    for t in tokens:
        ref, out = eager_step(model, caches[0], t), graph.step(t)
        assert torch.isfinite(out).all()
        assert_close(out, ref, torch.bfloat16, "replayed vs eager step logits", tol=2e-2)
    assert caches[1].host_lengths == caches[0].host_lengths == (340, 117)
    assert torch.equal(caches[1].first.lengths.cpu(), torch.tensor([340, 117], dtype=torch.int32))
    caches[1].clear()  # new sequences through the same graph
    prefill(model, caches[1], prompts)
    caches[0].clear()
    prefill(model, caches[0], prompts)
    for t in tokens[:5]:
        assert_close(graph.step(t), eager_step(model, caches[0], t), torch.bfloat16, "after clear()", tol=2e-2)
    ids = generate(model, [p.cpu() for p in prompts], 24)
    ids_graph = generate(copy.deepcopy(model), [p.cpu() for p in prompts], 24, cuda_graph=True)
    for a, b in zip(ids, ids_graph):  # the same kernels on the same inputs: the same greedy tokens
        assert torch.equal(a, b), f"graph generation picked {b.tolist()}, eager {a.tolist()}"
