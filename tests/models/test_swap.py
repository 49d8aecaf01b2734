"""use_nsa_attention on tiny Llama / Qwen2 / Qwen3 decoders through the reference ("torch") and
"dense" backends: logits and gradients against a hand-built float64 reference, packed varlen
against each sequence alone, dense against the unswapped HF model, argument checks."""
import copy

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import assert_close
from tests.models.grads import assert_grads_close
from tests.models.tiny_models import SMALL, VOCAB, cu, packed_positions, reference_logits, tiny_model

from nsa_baseline.models import NSAAttention, use_nsa_attention  # noqa: E402  (after the importorskip)

TOL = 2e-4  # fp32 model vs float64 reference (tests/helpers.py)


def swapped(family, backend="torch", **nsa):
    return use_nsa_attention(tiny_model(family), backend=backend, **{**SMALL, **nsa})


@pytest.mark.parametrize("family", ["llama", "qwen3", "qwen2"])
def test_swap_keeps_the_projections_and_adds_gates_and_compression(family):
    model = tiny_model(family)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    attn = [layer.self_attn for layer in model.model.layers]
    use_nsa_attention(model, backend="torch", **SMALL)
    after = model.state_dict()
    for name, value in before.items():  # every original weight kept, under its original name
        assert torch.equal(after[name], value), name
    hq = model.config.num_attention_heads
    for old, layer in zip(attn, model.model.layers):
        new = layer.self_attn
        assert isinstance(new, NSAAttention)
        assert all(getattr(new, p) is getattr(old, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj"))
        assert (new.q_norm is old.q_norm) if family == "qwen3" else new.q_norm is None
        assert new.gate_proj.weight.shape == (3 * hq, 64) and new.nsa.k_cmp_weight.shape == (4 * 16, 16)
        assert not new.nsa.projections and not hasattr(new.nsa, "q_proj")
    added = set(after) - set(before)
    assert {k.split("self_attn.")[1] for k in added} == {"gate_proj.weight", "nsa.k_cmp_weight", "nsa.v_cmp_weight",
                                                         "nsa.k_cmp_pos", "nsa.v_cmp_pos"}


@pytest.mark.parametrize("family,lengths", [("llama", (29, 0, 3, 17)), ("qwen3", (40,)), ("qwen2", (1, 33, 9))],
                         ids=["llama-g2-empty", "qwen3-g3-one", "qwen2-g2-bias"])
def test_torch_backend_matches_hand_built_reference(family, lengths):
    model = swapped(family)
    model.train()
    ref_model = copy.deepcopy(model).double()
    cs = cu(*lengths)
    n = int(cs[-1])
    ids, labels = torch.randint(0, VOCAB, (1, n)), torch.randint(0, VOCAB, (n,))
    logits = model(ids, cu_seq_lens_q=cs).logits
    ref = reference_logits(ref_model, ids, cs, SMALL)
    assert_close(logits, ref, torch.float32, "logits", tol=TOL)
    F.cross_entropy(logits[0], labels).backward()
    F.cross_entropy(ref[0], labels).backward()
    assert_grads_close(model, ref_model, TOL)


def test_packed_row_equals_each_sequence_alone_and_position_ids_equal_cu_seqlens():
    model = swapped("qwen3")
    lengths = (13, 1, 30, 8)
    ids = torch.randint(0, VOCAB, (1, sum(lengths)))
    packed = model(ids, position_ids=packed_positions(*lengths)).logits
    assert_close(model(ids, cu_seq_lens_q=cu(*lengths)).logits, packed, torch.float32, "cu_seqlens == position_ids",
                 tol=1e-6)
    alone = torch.cat([model(part).logits for part in ids.split(lengths, dim=1)], dim=1)
    assert_close(packed, alone, torch.float32, "packed vs alone", tol=TOL)
    # a batch of rows [B, S] is B sequences
    rows = ids[:, :48].view(3, 16)
    assert_close(model(rows).logits, torch.cat([model(r[None]).logits for r in rows]), torch.float32, "rows",
                 tol=TOL)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_dense_backend_equals_the_unswapped_model(family):
    hf = tiny_model(family).train()
    dense = use_nsa_attention(copy.deepcopy(hf), backend="dense")
    ids = torch.randint(0, VOCAB, (2, 37))
    out, ref = dense(ids).logits, hf(ids).logits
    assert_close(out, ref, torch.float32, "dense logits", tol=TOL)
    out.square().mean().backward()
    ref.square().mean().backward()
    assert_grads_close(dense, hf, TOL)
    lengths = (20, 5, 12)
    packed = dense(ids[:1], position_ids=packed_positions(*lengths)).logits
    alone = torch.cat([hf(part).logits for part in ids[:1].split(lengths, dim=1)], dim=1)
    assert_close(packed, alone, torch.float32, "dense packed vs HF per sequence", tol=TOL)


def test_generate_without_cache_recomputes_the_prefix_greedily():
    """HF generate with no cache (the swap's default) re-runs the whole prefix per token: slow but the
    same tokens as a greedy loop over full forwards."""
    model = swapped("qwen3")
    ids = torch.randint(0, VOCAB, (1, 20))
    out = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    seq = ids
    for _ in range(4):
        seq = torch.cat([seq, model(seq).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(out, seq)


def test_bad_arguments_raise_before_the_model_changes():
    model = tiny_model("llama")
    state = copy.deepcopy(model.state_dict())
    for kwargs, name in [(dict(backend="flash"), "backend"), (dict(backend="torch", head_dim=8), "head_dim"),
                         (dict(backend="torch", topk=0), "topk"), (dict(backend="fsa", block_size=8), "block_size")]:
        with pytest.raises(ValueError, match=f"`{name}`"):
            use_nsa_attention(model, **kwargs)
    assert type(model.model.layers[0].self_attn).__name__ == "LlamaAttention"
    assert model.config._attn_implementation != "nsa_baseline"
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="`model`"):
        use_nsa_attention(torch.nn.Linear(2, 2))
    use_nsa_attention(model, backend="torch", **SMALL)
    with pytest.raises(ValueError, match="`model`.*already NSAAttention"):
        use_nsa_attention(model, backend="torch", **SMALL)


def test_unsupported_inputs_name_the_argument():
    model = swapped("llama")
    ids = torch.randint(0, VOCAB, (2, 24))
    pad = torch.ones(2, 24, dtype=torch.long)
    pad[1, -3:] = 0
    with pytest.raises(ValueError, match="`attention_mask`"):
        model(ids, attention_mask=pad)
    model(ids, attention_mask=torch.ones_like(pad))  # all ones: nothing is masked
    with pytest.raises(ValueError, match="`use_cache`"):
        model(ids, use_cache=True)
    with pytest.raises(ValueError, match="`use_cache`"):
        model.generate(ids[:1], max_new_tokens=2, do_sample=False, use_cache=True)
    with pytest.raises(ValueError, match="`cu_seq_lens_q`"):
        model(ids[:1], cu_seq_lens_q=cu(10, 10))  # ends at 20, not 24
    with pytest.raises(ValueError, match="`cu_seq_lens_k`"):
        model(ids[:1], cu_seq_lens_q=cu(12, 12), cu_seq_lens_k=cu(24))
    with pytest.raises(ValueError, match="`past_key_values`"):
        layer = model.model.layers[0]
        x = torch.randn(1, 4, 64)
        layer.self_attn(x, model.model.rotary_emb(x, torch.arange(4)[None]), past_key_values=object())
    with pytest.raises(RuntimeError, match="projections=False"):
        layer.self_attn.nsa(torch.randn(4, 64))
