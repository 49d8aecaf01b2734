"""nsa_baseline.models.generate on tiny swapped decoders: a batch of prompts of different lengths,
prefilled packed then decoded one token per slot through each layer's NSA cache, generates exactly
what the full forward over prompt + generated tokens picks (teacher forcing), with the same logits;
torch backend in float64 (Llama g = 2, Qwen3 g = 3 with q/k norms), the fsa backend in fp32 through
the decode kernels (interpreter); eos, sampling and bad arguments."""
import copy

import pytest
import torch

from tests.helpers import assert_close
from tests.models.tiny_models import KERNEL, SMALL, VOCAB, cu, one_thread, tiny_model  # noqa: F401 (autouse fixture)

from nsa_baseline.backends import resolve_backend  # noqa: E402  (after tiny_models' importorskip)
from nsa_baseline.inference.decode import decode_serves  # noqa: E402
from nsa_baseline.models import GenerationCache, generate, use_nsa_attention  # noqa: E402


def prompts_of(*lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=g) for n in lengths]


def teacher_forced(model, prompts, generated):
    """Per prompt: the full forward's logits [len(generated), vocab] at the positions that picked each
    generated token (the whole batch in one packed row)."""
    seqs = [torch.cat([p, o]) for p, o in zip(prompts, generated)]
    with torch.no_grad():
        full = model(torch.cat(seqs)[None], cu_seq_lens_q=cu(*[len(s) for s in seqs])).logits[0]
    out, start = [], 0
    for p, s in zip(prompts, seqs):
        out.append(full[start + len(p) - 1: start + len(s) - 1])
        start += len(s)
    return out


# SMALL: summary every 2 tokens from 4, block 8, topk 3 (24 keys: the 30-token prompt leaves the
# top-T rule a choice), window 6. Prompts of 1 to 30 tokens + 12 cross all of them one token at a time.
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_greedy_generation_equals_teacher_forced_forward(family):
    model = use_nsa_attention(tiny_model(family), backend="torch", **SMALL).double()
    prompts = prompts_of(5, 30, 1, 13)
    ids, logits = generate(model, prompts, 12, return_logits=True)
    assert [len(o) for o in ids] == [12] * 4
    for b, (o, lg, ref) in enumerate(zip(ids, logits, teacher_forced(model, prompts, ids))):
        assert torch.equal(o, ref.argmax(-1)), f"prompt {b}: generated {o.tolist()}, forward picks {ref.argmax(-1).tolist()}"
        assert_close(lg, ref, torch.float64, f"prompt {b} logits")
    alone = generate(model, prompts[1:2], 12)[0]  # a slot's tokens do not depend on the other slots
    assert torch.equal(alone, ids[1])


def test_eos_stops_each_sequence_and_sampling_is_reproducible():
    model = use_nsa_attention(tiny_model("llama"), backend="torch", **SMALL).double()
    prompts = prompts_of(7, 2, 11, seed=3)
    full = generate(model, prompts, 8)
    eos = int(full[0][2])
    cut = generate(model, prompts, 8, eos_token_id=eos)
    for f, c in zip(full, cut):
        hit = (f == eos).nonzero()
        assert torch.equal(c, f[: int(hit[0]) + 1] if hit.numel() else f)
    assert len(cut[0]) <= 3 and cut[0][-1] == eos
    draws = [generate(model, prompts, 6, greedy=False, temperature=0.8, generator=torch.Generator().manual_seed(5))
             for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*draws))
    assert all(len(a) == 6 and 0 <= int(a.min()) and int(a.max()) < VOCAB for a in draws[0])


def test_bad_arguments_name_the_argument():
    model = use_nsa_attention(tiny_model("llama"), backend="torch", **SMALL)
    for kwargs, name in [(dict(input_ids_list=[]), "input_ids_list"),
                         (dict(input_ids_list=[torch.tensor([1, 2]), torch.tensor([], dtype=torch.long)]),
                          "input_ids_list"),
                         (dict(input_ids_list=torch.tensor([1, 2])), "input_ids_list"),
                         (dict(max_new_tokens=0), "max_new_tokens"),
                         (dict(greedy=False, temperature=0.0), "temperature")]:
        args = {"input_ids_list": [torch.tensor([1, 2])], "max_new_tokens": 2, **kwargs}
        with pytest.raises(ValueError, match=f"`{name}`"):
            generate(model, **args)
    with pytest.raises(ValueError, match="`model`.*dense"):
        generate(use_nsa_attention(tiny_model("llama"), backend="dense"), [[1, 2]], 2)
    with pytest.raises(ValueError, match="`model`"):
        generate(tiny_model("llama"), [[1, 2]], 2)
    cache = GenerationCache(model, 2, 8)
    cache.begin([3, 1], "cpu")
    with pytest.raises(ValueError, match="`nsa_cache`"):  # the plan says 4 new tokens, the call has 5
        model(torch.zeros(1, 5, dtype=torch.long), nsa_cache=cache)
    with pytest.raises(ValueError, match="`counts`"):  # past max_seqlen
        cache.begin([9, 0], "cpu")


def test_fsa_backend_generates_through_the_decode_kernels():
    """fp32, the decode kernels under the interpreter (one layer: the interpreter costs ~1 s per step).
    KERNEL: summary every 4 tokens from 8, block 16, window 12; prompts 14 and 3 + 6 tokens complete
    summaries, cross block 16 and slide the window."""
    try:
        resolve_backend("fsa")
    except ImportError as err:
        pytest.skip(str(err))
    model = use_nsa_attention(tiny_model("llama"), backend="fsa", **KERNEL)
    model.model.layers = model.model.layers[:1]
    model.config.num_hidden_layers = 1
    assert all(decode_serves(layer.self_attn.nsa, c) for layer, c in
               zip(model.model.layers, GenerationCache(model, 2, 32).caches()))
    oracle = copy.deepcopy(model).double()
    for layer in oracle.model.layers:
        layer.self_attn.nsa.backend, layer.self_attn.nsa._backend = "torch", None
    prompts = prompts_of(14, 3)
    ids, logits = generate(model, prompts, 6, return_logits=True)
    for b, (o, lg, ref) in enumerate(zip(ids, logits, teacher_forced(oracle, prompts, ids))):
        assert torch.equal(o, ref.argmax(-1)), f"prompt {b}: generated {o.tolist()}, forward picks {ref.argmax(-1).tolist()}"
        assert_close(lg, ref, torch.float32, f"prompt {b} logits")
