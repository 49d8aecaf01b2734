"""Triton sliding-window attention (nsa_baseline.ops.window_triton) against the reference.

CPU (interpreter, 16 x 16 tiles, outputs poisoned by conftest): o, lse and dq, dk, dv (gradients
through o and lse) against `sliding_window_attention_ref` in float64, fp32 and fp16, G = 1, 2, 3, 4,
D = 16 / 32 / 48 / 64; one sequence and packed ones with empty and one-token sequences; windows of 1,
narrower than a tile, spanning several tiles (unmasked middle tiles) and longer than the sequence.
GPU (bf16 at 16K and 64K, fp32): the same against the reference and the FlexAttention path,
every named launch config, determinism.
"""
import inspect

import pytest
import torch

from nsa_baseline import branches
from nsa_baseline.checks import forget_checked_cu_seqlens
from nsa_baseline.ops.window_triton import (CHOICES, INTERPRETER_CONFIGS, LaunchConfigs, TileConfig,
                                            sliding_window_attention_triton)
from nsa_baseline.reference.window import sliding_window_attention_ref
from tests.helpers import assert_close

FP64 = torch.float64
# cu_seqlens (None = one sequence) and N. "varlen": lengths 5, 0, 35, 1, 0, 36.
LAYOUTS = {"single": (None, 64), "single_odd": (None, 45), "varlen": ([0, 5, 5, 40, 41, 41, 77], 77)}


def _inputs(layout, h, g, d, dtype, device="cpu", seed=0):
    cu_list, n = LAYOUTS[layout] if isinstance(layout, str) else layout
    gen = torch.Generator().manual_seed(seed)
    cu = None if cu_list is None else torch.tensor(cu_list, dtype=torch.int32, device=device)
    q, k, v = (torch.randn(n, heads, d, generator=gen).to(device=device, dtype=dtype) for heads in (h * g, h, h))
    return [q, k, v], cu


def _check(ins, cu, window, dtype, ref_dtype=FP64, flex=False, seed=1, config=None):
    """Forward and gradients (random do and dlse) of the kernels vs the reference (and Flex)."""
    ours = [t.detach().clone().requires_grad_() for t in ins]
    ref_in = [t.detach().to(ref_dtype).requires_grad_() for t in ins]
    o, lse = sliding_window_attention_triton(*ours, window, cu, return_lse=True, config=config)
    ro, rlse = sliding_window_attention_ref(*ref_in, window, cu, return_lse=True)
    assert o.dtype == ins[0].dtype and lse.dtype == torch.float32 and lse.shape == (o.shape[1], o.shape[0])
    assert_close(o, ro, dtype, "o")
    assert_close(lse, rlse, dtype, "lse")
    gen = torch.Generator(device=o.device).manual_seed(seed)
    do = torch.randn(o.shape, generator=gen, device=o.device).to(o.dtype)
    dlse = torch.randn(lse.shape, generator=gen, device=o.device)
    grads = torch.autograd.grad([o, lse], ours, [do, dlse], retain_graph=flex)  # flex: a second backward below
    rgrads = torch.autograd.grad([ro, rlse], ref_in, [do.to(ref_dtype), dlse.to(ref_dtype)])
    for name, a, b in zip(("dq", "dk", "dv"), grads, rgrads):
        assert a.dtype == ins[0].dtype
        assert_close(a, b, dtype, name)
    if flex:  # the path it replaces (gradients through o: Flex's lse gradient is not compared)
        from nsa_baseline.ops.window import sliding_window_attention

        flex_in = [t.detach().clone().requires_grad_() for t in ins]
        fo, flse = sliding_window_attention(*flex_in, window, cu, return_lse=True)
        assert_close(o, fo, dtype, "o vs flex")
        assert_close(lse, flse, dtype, "lse vs flex")
        ours_o = torch.autograd.grad(o, ours, do)
        for name, a, b in zip(("dq", "dk", "dv"), ours_o, torch.autograd.grad(fo, flex_in, do)):
            assert_close(a, b, dtype, name + " vs flex")
    return o, lse, grads


# ---------------------------------------------------------------------------------------- CPU

CPU_CASES = [  # (layout, H, G, D, window, dtype)
    pytest.param("single", 2, 1, 16, 40, torch.float32, id="single-g1-d16-w40-fp32"),
    pytest.param("single_odd", 1, 3, 32, 20, torch.float32, id="odd-g3-d32-w20-fp32"),
    pytest.param("single", 1, 4, 16, 7, torch.float32, id="single-g4-d16-w7-fp32"),
    pytest.param("varlen", 1, 4, 16, 9, torch.float32, id="varlen-g4-d16-w9-fp32"),
    pytest.param("varlen", 2, 1, 32, 24, torch.float32, id="varlen-g1-d32-w24-fp32"),
    pytest.param("varlen", 1, 3, 16, 300, torch.float32, id="varlen-g3-d16-w300-fp32"),
    pytest.param("single_odd", 1, 3, 16, 1, torch.float32, id="odd-g3-d16-w1-fp32"),
    pytest.param("varlen", 1, 2, 48, 33, torch.float32, id="varlen-g2-d48-w33-fp32"),
    pytest.param("single_odd", 1, 1, 64, 17, torch.float16, id="odd-g1-d64-w17-fp16"),
    pytest.param("varlen", 1, 3, 32, 5, torch.float16, id="varlen-g3-d32-w5-fp16"),
]


@pytest.mark.parametrize("layout,h,g,d,window,dtype", CPU_CASES)
def test_window_triton_interpreter(layout, h, g, d, window, dtype):
    ins, cu = _inputs(layout, h, g, d, dtype)
    _check(ins, cu, window, dtype)


def test_window_triton_wide_tiles():
    """32 x 32 tiles (wider than most sequences: every tile crosses sequences), G = 3, scale given,
    o only (no lse returned: the backward gets no dlse)."""
    ins, cu = _inputs("varlen", 1, 3, 16, torch.float32)
    wide = TileConfig(32, 32, 1, 1)
    ours = [t.clone().requires_grad_() for t in ins]
    ref_in = [t.double().requires_grad_() for t in ins]
    o = sliding_window_attention_triton(*ours, 12, cu, 0.3, config=LaunchConfigs(wide, wide, wide))
    ro = sliding_window_attention_ref(*ref_in, 12, cu, 0.3)
    assert_close(o, ro, torch.float32, "o")
    do = torch.randn_like(o)
    for name, a, b in zip(("dq", "dk", "dv"), torch.autograd.grad(o, ours, do),
                          torch.autograd.grad(ro, ref_in, do.double())):
        assert_close(a, b, torch.float32, name)


def test_window_triton_lse_only_gradient():
    """Backward through lse alone (do = None inside the Function): dv = 0, dq and dk as the reference."""
    ins, cu = _inputs("varlen", 1, 3, 16, torch.float32)
    ours = [t.clone().requires_grad_() for t in ins]
    ref_in = [t.double().requires_grad_() for t in ins]
    _, lse = sliding_window_attention_triton(*ours, 10, cu, return_lse=True)
    _, rlse = sliding_window_attention_ref(*ref_in, 10, cu, return_lse=True)
    grads = torch.autograd.grad(lse.sum(), ours)
    rgrads = torch.autograd.grad(rlse.sum(), ref_in[:2])
    assert_close(grads[0], rgrads[0], torch.float32, "dq")
    assert_close(grads[1], rgrads[1], torch.float32, "dk")
    assert torch.equal(grads[2], torch.zeros_like(grads[2]))


def test_window_triton_no_tokens():
    """N = 0: empty outputs and gradients, no launch."""
    q = torch.randn(0, 4, 16, requires_grad=True)
    k, v = torch.randn(0, 2, 16, requires_grad=True), torch.randn(0, 2, 16, requires_grad=True)
    o, lse = sliding_window_attention_triton(q, k, v, 8, return_lse=True)
    assert o.shape == (0, 4, 16) and lse.shape == (4, 0)
    assert [g.shape for g in torch.autograd.grad(o.sum(), (q, k, v))] == [q.shape, k.shape, v.shape]


def test_window_triton_is_a_drop_in_for_the_branch():
    """Same parameters, in order, as branches.sliding_window_attention (plus `config` at the end)."""
    ours = list(inspect.signature(sliding_window_attention_triton).parameters)
    theirs = list(inspect.signature(branches.sliding_window_attention).parameters)
    assert ours[:len(theirs)] == theirs and ours[len(theirs):] == ["config"]
    assert set(CHOICES) >= {"default"} and INTERPRETER_CONFIGS.fwd.block_m >= 16


BAD_CALLS = [  # (what, call on good inputs -> raises ValueError matching)
    ("float64", lambda q, k, v, cu: sliding_window_attention_triton(q.double(), k.double(), v.double(), 4),
     "argument `q` has dtype torch.float64"),
    ("bf16 on CPU", lambda q, k, v, cu: sliding_window_attention_triton(*(t.bfloat16() for t in (q, k, v)), 4),
     "interpreter's bf16"),
    ("window 0", lambda q, k, v, cu: sliding_window_attention_triton(q, k, v, 0), "`window_size` must be an int >= 1"),
    ("window bool", lambda q, k, v, cu: sliding_window_attention_triton(q, k, v, True), "`window_size`"),
    ("k tokens", lambda q, k, v, cu: sliding_window_attention_triton(q, k[:-1], v[:-1], 4), "`k`, `v` must both be"),
    ("v shape", lambda q, k, v, cu: sliding_window_attention_triton(q, k, v[:, :, :8], 4), "`k`, `v` must both be"),
    ("heads", lambda q, k, v, cu: sliding_window_attention_triton(q[:, :3], k[:, :2].contiguous(),
                                                                   v[:, :2].contiguous(), 4), "multiple of num_kv_heads"),
    ("k dtype", lambda q, k, v, cu: sliding_window_attention_triton(q, k.half(), v.half(), 4), "q's dtype"),
    ("cu dtype", lambda q, k, v, cu: sliding_window_attention_triton(q, k, v, 4, cu.long()), "`cu_seqlens` must be an int32"),
    ("cu end", lambda q, k, v, cu: sliding_window_attention_triton(q, k, v, 4, cu[:-1].clone()), "must end at N"),
    ("scale", lambda q, k, v, cu: sliding_window_attention_triton(q, k, v, 4, scale=-1.0), "`scale`"),
    ("config", lambda q, k, v, cu: sliding_window_attention_triton(q, k, v, 4, config="fastest"), "`config`"),
    ("head dim", lambda q, k, v, cu: sliding_window_attention_triton(*(t.new_zeros(t.shape[0], t.shape[1], 272)
                                                                       for t in (q, k, v)), 4), "head dim D=272"),
]


@pytest.mark.parametrize("call,match", [pytest.param(c, m, id=i) for i, c, m in BAD_CALLS])
def test_window_triton_bad_arguments(call, match):
    forget_checked_cu_seqlens()
    (q, k, v), cu = _inputs("varlen", 2, 2, 16, torch.float32)
    with pytest.raises(ValueError, match=match):
        call(q, k, v, cu)


# ---------------------------------------------------------------------------------------- GPU

BF16 = torch.bfloat16
GPU_CASES = [  # (cu_seqlens or N, H, G, window)
    pytest.param(16384, 16, 1, 512, id="16K-h16-g1-w512"),
    pytest.param([0, 3000, 3010, 3011, 9000, 16384], 4, 4, 512, id="16K-h4-g4-w512-varlen"),
    pytest.param(16384, 1, 16, 512, id="16K-h1-g16-w512"),
    pytest.param([0, 5000, 5000, 16383], 2, 3, 100, id="16K-h2-g3-w100-varlen"),
    pytest.param(65536, 4, 4, 512, id="64K-h4-g4-w512"),
]


def _gpu_layout(spec):
    return (None, spec) if isinstance(spec, int) else (spec, spec[-1])


@pytest.mark.gpu
@pytest.mark.parametrize("spec,h,g,window", GPU_CASES)
def test_gpu_window_triton_bf16(spec, h, g, window):
    ins, cu = _inputs(_gpu_layout(spec), h, g, 128, BF16, device="cuda")
    _check(ins, cu, window, BF16, ref_dtype=torch.float32, flex=True)


@pytest.mark.gpu
@pytest.mark.parametrize("d", [128, 64, 48])
def test_gpu_window_triton_fp32(d):
    ins, cu = _inputs(_gpu_layout([0, 1000, 1017, 4096]), 2, 3, d, torch.float32, device="cuda")
    _check(ins, cu, 300, torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(CHOICES))
def test_gpu_window_triton_configs(name):
    ins, cu = _inputs(_gpu_layout([0, 3000, 3007, 8192]), 2, 4, 128, BF16, device="cuda")
    _check(ins, cu, 512, BF16, ref_dtype=torch.float32, config=name)


@pytest.mark.gpu
def test_gpu_window_triton_deterministic():
    ins, cu = _inputs(_gpu_layout(16384), 4, 4, 128, BF16, device="cuda")
    runs = []
    for _ in range(2):
        ours = [t.clone().requires_grad_() for t in ins]
        o, lse = sliding_window_attention_triton(*ours, 512, cu, return_lse=True)
        runs.append((o, lse) + torch.autograd.grad(o, ours, torch.ones_like(o)))
    assert all(torch.equal(a, b) for a, b in zip(*runs))
