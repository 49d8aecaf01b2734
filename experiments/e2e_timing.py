"""Timing of NSA inside real model shapes (CUDA): L decoder layers of Llama3-8B / Qwen3-14B /
Qwen2.5-32B (transformers, random weights, bf16) with dense, NSA or FSA attention
(nsa_baseline.models.use_nsa_attention). Shared by `python -m experiments.e2e` (the Hydra entry,
resumable rows) and `python -m experiments.gpu.e2e_layers` (the one-call script).

One sequence of N tokens through the bare decoder (LlamaModel / Qwen3Model / Qwen2Model:
inputs_embeds in, final norm out; no embedding / LM head, whose vocab matmul would dominate and is
the same for every backend):
- train: one training step = forward + backward of mean(out^2) + AdamW step (fused, bf16 params);
  prefill: one forward under no_grad. Median of `reps` timed calls after one warmup (CUDA events; a
  64K training step of 2 layers takes ~1 s, so triton's do_bench, which needs >= 8 calls, is too
  slow here); peak memory of the timed calls (torch.cuda.max_memory_allocated).
- per layer: step / L, and the attention / MLP split of layer 0 timed alone (do_bench medians):
  self_attn (projections + RoPE + attention + o_proj) and mlp, forward (prefill) and fwd+bwd (train),
  on that layer's real inputs (the FSA paper's Figure 10).
- generate: the prefill of the same N tokens with a KV cache, then 512 decode steps of one token
  each (experiments/e2e_generate.py says what runs). Median of `generate_reps` calls (default 1)
  after one warmup, since one call is seconds; ms = the whole call, ttft_ms = its prefill (a CUDA
  event between the prefill and the first step, same call), ms_per_token = (ms - ttft_ms) / 512;
  no attention / MLP split. Dense runs the unswapped decoder (HF's SDPA attention and DynamicCache;
  our dense swap, timed by train / prefill, keeps no cache); peak memory of the warmup and timed calls.
Heads and head_dim from configs/model/<model>.yaml; hidden / intermediate sizes and RoPE base from the
models' config.json (SHAPES). NSA: kernel 32 / stride 16, window 512, (BS, T) per call.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Optional

import torch

from experiments.e2e_generate import STEP_MODES

REPO = Path(__file__).resolve().parents[1]
BF16 = torch.bfloat16
STEPS = ("train", "prefill", "generate", "generate_graph")
# config.json of meta-llama/Meta-Llama-3-8B, Qwen/Qwen3-14B and Qwen/Qwen2.5-32B: what configs/model/
# does not hold.
SHAPES = {
    "llama3_8b": dict(family="llama", hidden_size=4096, intermediate_size=14336, rope_theta=500000.0),
    "qwen3_14b": dict(family="qwen3", hidden_size=5120, intermediate_size=17408, rope_theta=1000000.0),
    "qwen2_5_32b": dict(family="qwen2", hidden_size=5120, intermediate_size=27648, rope_theta=1000000.0),
}
CLASSES = {"llama": ("LlamaConfig", "LlamaModel"), "qwen3": ("Qwen3Config", "Qwen3Model"),
           "qwen2": ("Qwen2Config", "Qwen2Model")}
NSA = dict(kernel_size=32, kernel_stride=16, window_size=512)


def heads(model: str) -> tuple[int, int, int]:
    """(HQ, H, D) from configs/model/<model>.yaml."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(REPO / "configs" / "model" / f"{model}.yaml")
    gqa = int(cfg.hydra.sweeper.params.gqa)
    return int(cfg.q_heads), int(cfg.q_heads) // gqa, int(cfg.head_dim)


def build(model: str, layers: int, max_len: int):
    """The bare decoder (random weights, seed 0) with `layers` layers, bf16 on the GPU."""
    import transformers

    shape = SHAPES[model]
    hq, h, d = heads(model)
    cls = CLASSES[shape["family"]]
    config = getattr(transformers, cls[0])(
        vocab_size=256, hidden_size=shape["hidden_size"], intermediate_size=shape["intermediate_size"],
        num_hidden_layers=layers, num_attention_heads=hq, num_key_value_heads=h, head_dim=d,
        max_position_embeddings=max_len, rope_parameters={"rope_type": "default", "rope_theta": shape["rope_theta"]},
        use_cache=False)
    with torch.device("cuda"):
        torch.manual_seed(0)
        return getattr(transformers, cls[1])(config).to(BF16)


def cuda_median(fn, reps: int, split: bool = False):
    """Median ms of `reps` calls after one warmup call, each timed by CUDA events. split: fn(mark) is
    handed the record of a middle event; returns (ms, ms up to the mark) of the median call."""
    args = (lambda: None,) if split else ()
    fn(*args)
    times = []
    for _ in range(reps):
        start, mid, end = (torch.cuda.Event(enable_timing=True) for _ in range(3))
        start.record()
        fn(*((mid.record,) if split else ()))
        end.record()
        torch.cuda.synchronize()
        times.append((start.elapsed_time(end), start.elapsed_time(mid) if split else 0.0))
    ms, first = sorted(times)[len(times) // 2]
    return (ms, first) if split else ms


def bench(fn) -> float:
    import triton

    return triton.testing.do_bench(fn, warmup=1, rep=1, return_mode="median")  # >= 8 calls, ~0.1-0.5 s each


def layer_pieces(model, x: torch.Tensor, train: bool) -> dict:
    """ms of layer 0's self_attn and mlp alone on their real inputs (fwd, or fwd+bwd when `train`)."""
    layer = model.layers[0]
    pos = torch.arange(x.shape[1], device=x.device)[None]
    with torch.no_grad():
        pe = model.rotary_emb(x, position_ids=pos)
        h_attn = layer.input_layernorm(x)
        h_mlp = layer.post_attention_layernorm(x + layer.self_attn(h_attn, position_embeddings=pe)[0])
    out = {}
    for name, fn, inp in (("attn", lambda t: layer.self_attn(t, position_embeddings=pe)[0], h_attn),
                          ("mlp", layer.mlp, h_mlp)):
        if train:
            inp = inp.detach().requires_grad_()
            dy = torch.randn_like(inp)
            out[name] = bench(lambda: torch.autograd.backward(fn(inp), dy))
        else:
            with torch.no_grad():
                out[name] = bench(lambda: fn(inp))
    model.zero_grad(set_to_none=True)
    return out


def failure(err: BaseException) -> tuple[str, str]:
    """(status, one-line message) of an exception raised while timing."""
    text = str(err).splitlines()[0][:200] if str(err) else ""
    if isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in text.lower():
        return "oom", text
    return "error", f"{type(err).__name__}: {text}"


def time_generate(base, model, backend: str, x: torch.Tensor, reps: int, mode: str = "eager") -> dict:
    """A generate step's measures (median call of `reps` after one warmup, which also captures the
    graphs of mode graph)."""
    from experiments import e2e_generate as gen

    steps = gen.decode_inputs(x.shape[-1], gen.NEW_TOKENS, x.device, x.dtype)
    ms, ttft = cuda_median(gen.generate_fn(base, model, backend, x, steps, mode), reps, split=True)
    return dict(ms=ms, ttft_ms=ttft, ms_per_token=(ms - ttft) / gen.NEW_TOKENS,
                message=gen.message(backend, model, mode))


def measure(base, n: int, backend: str, preset: Optional[tuple[int, int]], reps: int,
            steps=STEPS, generate_reps: int = 1) -> list[dict]:
    """Time `steps` of one backend on a copy of the decoder `base` with one N-token sequence (dense's
    generate runs `base` itself, unchanged: its HF attention takes the DynamicCache).

    Returns one dict per step: step, status (ok / oom / error), message, and for ok rows ms (median),
    ms_per_layer, peak_gb, and attn_ms, mlp_ms, attn_share (train, prefill) or ttft_ms, ms_per_token
    (generate) (floats). A failure is a row, never raised."""
    from nsa_baseline.models import use_nsa_attention

    layers = len(base.layers)
    out = []
    try:
        model = copy.deepcopy(base)
        use_nsa_attention(model, backend=backend, **({**NSA, "block_size": preset[0], "topk": preset[1]}
                                                     if preset else {}))
        device = next(base.parameters()).device  # CUDA here; CPU in the tests of the generate row
        x = torch.randn(1, n, model.config.hidden_size, device=device, dtype=BF16,
                        generator=torch.Generator(device).manual_seed(1))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    except Exception as err:  # recorded, the caller goes on
        status, message = failure(err)
        torch.cuda.empty_cache()
        return [dict(step=s, status=status, message=message) for s in steps]

    def train_step():
        opt.zero_grad(set_to_none=True)
        model(inputs_embeds=x).last_hidden_state.float().square().mean().backward()
        opt.step()

    def prefill():
        with torch.no_grad():
            model(inputs_embeds=x)

    fns = {"train": train_step, "prefill": prefill}
    for name in steps:
        try:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            if name in STEP_MODES:
                res = time_generate(base, model, backend, x, generate_reps, STEP_MODES[name])
                out.append(dict(step=name, status="ok", ms_per_layer=res["ms"] / layers,
                                peak_gb=torch.cuda.max_memory_allocated() / 2**30, **res))
                continue
            ms = cuda_median(fns[name], reps)
            peak = torch.cuda.max_memory_allocated() / 2**30
            pieces = layer_pieces(model, x, train=name == "train")
            out.append(dict(step=name, status="ok", message="", ms=ms, ms_per_layer=ms / layers, peak_gb=peak,
                            attn_ms=pieces["attn"], mlp_ms=pieces["mlp"],
                            attn_share=pieces["attn"] / (pieces["attn"] + pieces["mlp"])))
        except Exception as err:  # recorded, the caller goes on
            status, message = failure(err)
            out.append(dict(step=name, status=status, message=message))
    return out  # the copy is freed here; the next call's empty_cache returns its memory
