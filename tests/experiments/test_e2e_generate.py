"""The body of experiments.e2e's generate step on tiny bare decoders on CPU (its timing wrapper only adds
CUDA events): prefill + decode steps through HF's DynamicCache (dense) or NSA's GenerationCache end at
the hidden state the full forward over prefill + step inputs gives at the last position (teacher
forcing); float64 with the torch backend, fp32 through the decode kernels (interpreter) with fsa."""
import copy

import pytest
import torch

from tests.helpers import assert_close
from tests.models.tiny_models import KERNEL, SMALL, one_thread, tiny_model  # noqa: F401 (autouse fixture)

from experiments import e2e_generate  # noqa: E402  (after tiny_models' importorskip)
from nsa_baseline.backends import resolve_backend  # noqa: E402
from nsa_baseline.models import use_nsa_attention  # noqa: E402


def inputs(model, n: int, new_tokens: int, dtype):
    hidden = model.config.hidden_size
    x = torch.randn(1, n, hidden, dtype=dtype, generator=torch.Generator().manual_seed(1))
    return x, e2e_generate.decode_inputs(hidden, new_tokens, "cpu", dtype)


def full_forward_last(model, x, steps):
    """The last position's hidden state of one forward over prefill + step inputs (no cache)."""
    with torch.no_grad():
        return model(inputs_embeds=torch.cat([x, steps[None]], dim=1)).last_hidden_state[0, -1]


def one_layer_fsa():
    """(bare one-layer decoder, its FSA swap, the swap in float64 on the torch backend: the oracle);
    skips where the FSA kernels cannot run."""
    try:
        resolve_backend("fsa")
    except ImportError as err:
        pytest.skip(str(err))
    base = tiny_model("llama").model
    base.layers = base.layers[:1]
    base.config.num_hidden_layers = 1
    model = use_nsa_attention(copy.deepcopy(base), backend="fsa", **KERNEL)
    oracle = copy.deepcopy(model).double()
    for layer in oracle.layers:
        layer.self_attn.nsa.backend, layer.self_attn.nsa._backend = "torch", None
    return base, model, oracle


def test_dense_generate_equals_the_full_forward():
    base = tiny_model("llama").model.double()  # the bare decoder, HF attention (SDPA)
    x, steps = inputs(base, 19, 7, torch.float64)
    marks = []
    out = e2e_generate.generate_fn(base, None, "dense", x, steps)(lambda: marks.append(1))
    assert marks == [1]  # between the prefill and the first step
    assert_close(out, full_forward_last(base, x, steps), torch.float64, "dense generate, last hidden")


# SMALL: summary every 2 tokens from 4, block 8, topk 3, window 6; 30 + 12 tokens cross all of them
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_nsa_generate_equals_the_teacher_forced_forward(family):
    base = tiny_model(family).model.double()
    model = use_nsa_attention(copy.deepcopy(base), backend="torch", **SMALL)
    x, steps = inputs(base, 30, 12, torch.float64)
    out = e2e_generate.generate_fn(base, model, "nsa", x, steps)()
    assert_close(out, full_forward_last(model, x, steps), torch.float64, "NSA generate, last hidden")
    assert "PyTorch branches" in e2e_generate.message("nsa", model)  # torch backend: no decode kernels
    assert "DynamicCache" in e2e_generate.message("dense", base)


def test_fsa_generate_runs_the_decode_kernels():
    """fp32, one layer (the interpreter costs ~1 s per step); KERNEL: summary every 4 tokens from 8,
    block 16, window 12: 14 + 5 tokens complete summaries, cross block 16 and slide the window."""
    base, model, oracle = one_layer_fsa()
    assert e2e_generate.decode_kernels(model)
    assert e2e_generate.message("fsa", model).startswith("eager, 512 steps, NSA GenerationCache, decode kernels")
    x, steps = inputs(base, 14, 5, torch.float32)
    out = e2e_generate.generate_fn(base, model, "fsa", x, steps)()
    assert_close(out.double(), full_forward_last(oracle, x.double(), steps.double()), torch.float32,
                 "FSA generate, last hidden")


def test_graph_mode_bodies_equal_the_full_forward(monkeypatch):
    """mode graph with capture=False (what the graphs record, run eagerly on CPU): dense over HF's
    StaticCache through _sdpa_gqa, FSA through GenerationGraph's body; each fn called twice, as timing
    does (the second call clears and reuses the first one's caches)."""
    seen = []
    sdpa_gqa = e2e_generate._sdpa_gqa
    monkeypatch.setattr(e2e_generate, "_sdpa_gqa", lambda *a, **k: seen.append(a[1].shape[2]) or sdpa_gqa(*a, **k))
    base = tiny_model("llama").model.double()
    x, steps = inputs(base, 19, 7, torch.float64)
    fn = e2e_generate.generate_fn(base, None, "dense", x, steps, mode="graph", capture=False)
    for _ in range(2):
        marks = []
        out = fn(lambda: marks.append(1))
        assert marks == [1]
        assert_close(out, full_forward_last(base, x, steps), torch.float64, "dense StaticCache generate, last hidden")
    assert seen == ([19] * 2 + [1] * 14) * 2  # 2 layers: the prefill, then 7 steps; twice
    assert base.config._attn_implementation == "sdpa"  # given back
    base, model, oracle = one_layer_fsa()
    x, steps = inputs(base, 14, 5, torch.float32)
    fn = e2e_generate.generate_fn(base, model, "fsa", x, steps, mode="graph", capture=False)
    ref = full_forward_last(oracle, x.double(), steps.double())
    for _ in range(2):
        assert_close(fn().double(), ref, torch.float32, "FSA GenerationGraph body generate, last hidden")
    assert e2e_generate.message("fsa", model, "graph").startswith("CUDA graph of the whole decode step")
    with pytest.raises(ValueError, match="`mode`"):
        e2e_generate.generate_fn(base, model, "fsa", x, steps, mode="compiled")


def test_measure_records_the_generate_row(monkeypatch):
    """e2e_timing.measure's generate row on CPU (bf16, 4 new tokens), the CUDA timing and memory calls
    faked: dense runs the unswapped decoder, NSA the swapped copy; ms_per_token leaves the prefill out."""
    from experiments import e2e_timing

    def fake_median(fn, reps, split=False):
        marks = []
        fn(lambda: marks.append(1))
        assert split and marks == [1] and reps == 1
        return 30.0, 10.0

    monkeypatch.setattr(e2e_timing, "cuda_median", fake_median)
    monkeypatch.setattr(e2e_generate, "NEW_TOKENS", 4)
    for name in ("empty_cache", "reset_peak_memory_stats"):
        monkeypatch.setattr(torch.cuda, name, lambda: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: 2**30)
    base = tiny_model("llama").model.to(torch.bfloat16)
    rows = [e2e_timing.measure(base, 100, backend, preset, 3, ("generate",), generate_reps=1)[0]
            for backend, preset in (("dense", None), ("torch", (64, 3)))]
    assert [r["status"] for r in rows] == ["ok", "ok"], rows
    for r in rows:
        assert (r["ms"], r["ttft_ms"], r["ms_per_token"], r["ms_per_layer"], r["peak_gb"]) == (30.0, 10.0, 5.0, 15.0, 1.0)
    assert rows[0]["message"] == "eager, 4 steps, HF DynamicCache, SDPA; ttft_ms timed within the call"
    assert "NSA GenerationCache, PyTorch branches" in rows[1]["message"]
