"""Triton compressed attention (nsa_baseline.ops.compressed_triton) against the reference.

CPU (interpreter, outputs poisoned by conftest): forward (o, lse) and backward (dq, dk_cmp, dv_cmp,
with gradients through both o and lse) against `compressed_attention_ref` in float64, for one
sequence and packed sequences (odd lengths, sequences shorter than kernel_size, summary tiles
straddling sequences), G = 1, 3, 4, 16, D = 64 and 48, fp32 and fp16. GPU (bf16, 8K tokens): the
same against the reference and the FlexAttention path, fp32 against the reference, determinism.
"""
import pytest
import torch

from nsa_baseline.ops.compressed import compressed_attention_flex
from nsa_baseline.ops.compressed_triton import (INTERPRETER_CONFIGS, LaunchConfigs, TileConfig,
                                                compressed_attention_triton)
from nsa_baseline.reference.compressed import compressed_attention_ref
from nsa_baseline.reference.compression import compress_kv
from tests.helpers import assert_close

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

# cu_seqlens (None = one sequence). "varlen": lengths 7 (no summary), 323, 15 (none), 55, 33 (one).
LAYOUTS = {"single": (None, 333), "varlen": ([0, 7, 330, 345, 400, 433], 433),
           # G = 16 (16 rows per token): shorter, lengths 7, 193, 15, 34
           "single_short": (None, 200), "varlen_short": ([0, 7, 200, 215, 249], 249)}
# Interpreter tiles: 32 rows x 16 summaries. The 323-token sequence has 19 summaries and the single
# one 19, so tiles run unmasked (rows past position 270 see 16 summaries), masked and across sequences.
FP64 = torch.float64


def _inputs(layout, h, g, d, dtype, device="cpu", seed=0):
    cu_list, n = LAYOUTS[layout] if isinstance(layout, str) else layout
    gen = torch.Generator().manual_seed(seed)
    cu = None if cu_list is None else torch.tensor(cu_list, dtype=torch.int32, device=device)
    q = torch.randn(n, h * g, d, generator=gen).to(device)
    k_cmp, cu_cmp = compress_kv(torch.randn(n, h, d, generator=gen).to(device), cu)
    v_cmp, _ = compress_kv(torch.randn(n, h, d, generator=gen).to(device), cu)
    return [t.to(dtype) for t in (q, k_cmp, v_cmp)], cu, cu_cmp


def _check(ins, cu, cu_cmp, dtype, ref_dtype=FP64, backward=True, flex=False, seed=1):
    """Forward and gradients (random do and dlse) of the kernel vs the reference (and Flex)."""
    ours = [t.detach().clone().requires_grad_(backward) for t in ins]
    ref_in = [t.detach().to(ref_dtype).requires_grad_(backward) for t in ins]
    o, lse = compressed_attention_triton(*ours, cu, cu_cmp)
    ro, rlse = compressed_attention_ref(*ref_in, cu, cu_cmp)
    assert o.dtype == ins[0].dtype and lse.dtype == torch.float32
    assert_close(o, ro, dtype, "o")
    assert_close(lse, rlse, dtype, "lse")
    if flex:
        fo, flse = compressed_attention_flex(*[t.detach() for t in ins], cu, cu_cmp)
        assert_close(o, fo, dtype, "o vs flex")
        assert_close(lse, flse, dtype, "lse vs flex")
    if not backward:
        return
    gen = torch.Generator(device=o.device).manual_seed(seed)
    do = torch.randn(o.shape, generator=gen, device=o.device).to(o.dtype)
    dlse = torch.randn(lse.shape, generator=gen, device=o.device)
    seen = torch.isfinite(rlse)  # d lse on rows that see a summary (elsewhere lse = -inf, no gradient)
    grads = torch.autograd.grad([o, torch.where(seen, lse, 0.)], ours, [do, dlse])
    rgrads = torch.autograd.grad([ro, torch.where(seen, rlse, 0.)], ref_in, [do.to(ref_dtype), dlse.to(ref_dtype)])
    for name, a, b in zip(("dq", "dk_cmp", "dv_cmp"), grads, rgrads):
        assert a.dtype == ins[0].dtype
        assert_close(a, b, dtype, name)
    return grads


# ---------------------------------------------------------------------------------------- CPU

CPU_CASES = [  # (layout, H, G, D, dtype)
    pytest.param("single", 2, 1, 64, torch.float32, id="single-g1-d64-fp32"),
    pytest.param("varlen", 2, 1, 64, torch.float32, id="varlen-g1-d64-fp32"),
    pytest.param("single", 1, 3, 64, torch.float32, id="single-g3-d64-fp32"),
    pytest.param("varlen", 2, 3, 64, torch.float32, id="varlen-g3-d64-fp32"),
    pytest.param("varlen", 1, 4, 64, torch.float32, id="varlen-g4-d64-fp32"),
    pytest.param("single_short", 1, 16, 64, torch.float32, id="single-g16-d64-fp32"),
    pytest.param("varlen_short", 1, 16, 64, torch.float32, id="varlen-g16-d64-fp32"),
    pytest.param("varlen", 1, 3, 48, torch.float32, id="varlen-g3-d48-fp32"),
    pytest.param("varlen", 1, 4, 64, torch.float16, id="varlen-g4-d64-fp16"),
    pytest.param("single", 1, 3, 48, torch.float16, id="single-g3-d48-fp16"),
]


@pytest.mark.parametrize("layout,h,g,d,dtype", CPU_CASES)
def test_compressed_triton_interpreter(layout, h, g, d, dtype):
    ins, cu, cu_cmp = _inputs(layout, h, g, d, dtype)
    _check(ins, cu, cu_cmp, dtype)


def test_compressed_triton_wide_tiles():
    """Tiles wider than a sequence's summaries (32 x 32), G = 3: every tile crosses sequences."""
    ins, cu, cu_cmp = _inputs("varlen", 1, 3, 32, torch.float32)
    wide = TileConfig(32, 32, 1, 1)
    ours = [t.clone().requires_grad_() for t in ins]
    o, lse = compressed_attention_triton(*ours, cu, cu_cmp, configs=LaunchConfigs(wide, wide, wide))
    ro, rlse = compressed_attention_ref(*[t.double() for t in ins], cu, cu_cmp)
    assert_close(o, ro, torch.float32, "o")
    assert_close(lse, rlse, torch.float32, "lse")
    o.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in ours)


@pytest.mark.parametrize("layout,g,splits", [("varlen", 3, 3), ("single_short", 16, 2), ("varlen", 1, 8)])
def test_compressed_triton_dkdv_row_shares(layout, g, splits):
    """dK/dV with the rows of every summary tile shared by several programs (fp32 partials summed),
    as with few KV heads on the GPU: shares that are empty, masked, unmasked and mixed."""
    ins, cu, cu_cmp = _inputs(layout, 1, g, 32, torch.float32)
    cfgs = INTERPRETER_CONFIGS._replace(dkdv_splits=splits)
    ours = [t.clone().requires_grad_() for t in ins]
    ref_in = [t.double().requires_grad_() for t in ins]
    o, _ = compressed_attention_triton(*ours, cu, cu_cmp, configs=cfgs)
    ro, _ = compressed_attention_ref(*ref_in, cu, cu_cmp)
    do = torch.randn_like(o)
    for name, a, b in zip(("dq", "dk_cmp", "dv_cmp"), torch.autograd.grad(o, ours, do),
                          torch.autograd.grad(ro, ref_in, do.double())):
        assert a.dtype == torch.float32
        assert_close(a, b, torch.float32, name)


def test_dkdv_splits_rule(monkeypatch):
    """Row shares only where the summary tiles give fewer than two programs per SM (rule only)."""
    import nsa_baseline.ops.compressed_triton as ct

    monkeypatch.setattr(ct, "is_interpreter", lambda: False)
    monkeypatch.setattr(ct, "_sm_count", lambda device: 132)
    cfg = TileConfig(64, 64, 8, 2)
    assert ct.dkdv_splits(cfg, 4095, 4, "cuda") == 2  # G = 16 at 64K: 256 programs -> 512
    assert ct.dkdv_splits(cfg, 4095, 64, "cuda") == 1  # G = 1: 4096 programs
    assert ct.dkdv_splits(cfg, 100, 1, "cuda") == ct.MAX_DKDV_SPLITS
    assert ct.dkdv_splits(cfg, 4095, 4, "cpu") == 1


def test_compressed_triton_kernel_sizes():
    """Other (kernel_size, stride) on the same cu_seqlens tensor (the per-tensor caches must not mix)."""
    cu = torch.tensor([0, 40, 47, 170], dtype=torch.int32)
    q = torch.randn(170, 2, 16)
    k, v = torch.randn(170, 1, 16), torch.randn(170, 1, 16)
    for ks, stride in ((32, 16), (16, 8), (24, 24)):
        k_cmp, cu_cmp = compress_kv(k, cu, ks, stride)
        v_cmp, _ = compress_kv(v, cu, ks, stride)
        ins = [q, k_cmp, v_cmp]
        ours = [t.clone().requires_grad_() for t in ins]
        ref_in = [t.double().requires_grad_() for t in ins]
        o, lse = compressed_attention_triton(*ours, cu, None, ks, stride)
        ro, rlse = compressed_attention_ref(*ref_in, cu, cu_cmp, ks, stride)
        assert_close(o, ro, torch.float32, f"o ({ks}, {stride})")
        assert_close(lse, rlse, torch.float32, f"lse ({ks}, {stride})")
        do = torch.randn_like(o)
        for name, a, b in zip(("dq", "dk_cmp", "dv_cmp"), torch.autograd.grad(o, ours, do),
                              torch.autograd.grad(ro, ref_in, do.double())):
            assert_close(a, b, torch.float32, f"{name} ({ks}, {stride})")


def test_compressed_triton_no_summary():
    """Every sequence shorter than kernel_size: o = 0, lse = -inf, zero gradients, no launch."""
    cu = torch.tensor([0, 10, 31], dtype=torch.int32)
    q = torch.randn(31, 4, 16, requires_grad=True)
    k_cmp, cu_cmp = compress_kv(torch.randn(31, 2, 16), cu)
    v_cmp, _ = compress_kv(torch.randn(31, 2, 16), cu)
    k_cmp.requires_grad_()
    v_cmp.requires_grad_()
    o, lse = compressed_attention_triton(q, k_cmp, v_cmp, cu, cu_cmp)
    assert k_cmp.shape[0] == 0 and torch.equal(o, torch.zeros_like(o))
    assert bool((lse == float("-inf")).all())
    dq, dk = torch.autograd.grad(o.sum(), (q, k_cmp))
    assert torch.equal(dq, torch.zeros_like(q)) and dk.shape == k_cmp.shape


def test_compressed_triton_lse_only_gradient():
    """Backward through lse alone (do = None inside the Function)."""
    ins, cu, cu_cmp = _inputs("varlen", 1, 3, 32, torch.float32)
    ours = [t.clone().requires_grad_() for t in ins]
    ref_in = [t.double().requires_grad_() for t in ins]
    _, lse = compressed_attention_triton(*ours, cu, cu_cmp)
    _, rlse = compressed_attention_ref(*ref_in, cu, cu_cmp)
    seen = torch.isfinite(rlse)
    for name, a, b in zip(("dq", "dk_cmp", "dv_cmp"),
                          torch.autograd.grad(torch.where(seen, lse, 0.).sum(), ours, allow_unused=True),
                          torch.autograd.grad(torch.where(seen, rlse, 0.).sum(), ref_in, allow_unused=True)):
        b = torch.zeros_like(ours[2], dtype=FP64) if b is None else b  # v does not reach lse
        assert_close(a, b, torch.float32, name, tol=2e-4 if b.norm() > 0 else 0.0)


def test_dkdv_config_fills_the_gpu(monkeypatch):
    """Few programs (few KV heads): the measured few-programs tile, then row shares (rule only; no GPU)."""
    import nsa_baseline.ops.compressed_triton as ct

    monkeypatch.setattr(ct, "is_interpreter", lambda: False)
    monkeypatch.setattr(ct, "_sm_count", lambda device: 132)
    cfg = TileConfig(32, 128, 8, 3)
    bf16_128 = ct.config_key(128, torch.bfloat16)
    few = ct.DKDV_FEW_PROGRAMS[bf16_128]
    assert ct.dkdv_config(cfg, 4095, 4, "cuda", bf16_128) == few  # G = 16 at 64K: 128 programs
    assert ct.dkdv_config(cfg, 4095, 64, "cuda", bf16_128) == cfg  # G = 1: 2048 programs already
    assert ct.dkdv_config(cfg, 4095, 4, "cuda") == cfg  # no measured tile for this key: kept
    assert ct.dkdv_config(cfg, 100, 1, "cpu") == cfg
    assert ct.dkdv_splits(few, 4095, 4, "cuda") == 3  # 128 programs -> 384 for 132 SMs


def test_compressed_triton_fallbacks_and_errors():
    ins, cu, cu_cmp = _inputs("varlen", 1, 2, 16, FP64)
    with pytest.raises(ValueError, match="argument `q` has dtype torch.float64"):  # the reference's job
        compressed_attention_triton(*ins, cu, cu_cmp)
    with pytest.raises(ValueError, match="interpreter's bf16"):
        compressed_attention_triton(*(t.to(torch.bfloat16) for t in ins), cu, cu_cmp)
    q = torch.randn(40, 2, 272)
    k_cmp, cu_cmp = compress_kv(torch.randn(40, 1, 272), None)
    with pytest.raises(ValueError, match="head dim"):
        compressed_attention_triton(q, k_cmp, k_cmp, None, cu_cmp)
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        compressed_attention_triton(torch.randn(40, 3, 16), *(compress_kv(torch.randn(40, 2, 16), None)[0],) * 2,
                                    None, None)
    with pytest.raises(ValueError, match="power of two"):
        TileConfig(24, 16, 1, 1)
    assert INTERPRETER_CONFIGS.fwd.block_m >= 16


# ---------------------------------------------------------------------------------------- GPU

BF16 = torch.bfloat16
GPU_CASES = [  # (cu_seqlens or N, H, G)
    pytest.param(8192, 16, 1, id="8K-h16-g1"),
    pytest.param([0, 3000, 3010, 3041, 8192], 4, 4, id="8K-h4-g4-varlen"),
    pytest.param(8192, 1, 16, id="8K-h1-g16"),
    pytest.param([0, 5000, 8191], 2, 3, id="8K-h2-g3-varlen"),
]


def _gpu_layout(spec):
    return (None, spec) if isinstance(spec, int) else (spec, spec[-1])


@pytest.mark.gpu
@pytest.mark.parametrize("spec,h,g", GPU_CASES)
def test_gpu_compressed_triton_bf16(spec, h, g):
    ins, cu, cu_cmp = _inputs(_gpu_layout(spec), h, g, 128, BF16, device="cuda")
    _check(ins, cu, cu_cmp, BF16, ref_dtype=torch.float32, flex=True)


@pytest.mark.gpu
def test_gpu_compressed_triton_vs_flex_backward():
    ins, cu, cu_cmp = _inputs(_gpu_layout([0, 3000, 3010, 8192]), 4, 4, 128, BF16, device="cuda")
    ours = [t.clone().requires_grad_() for t in ins]
    flex = [t.clone().requires_grad_() for t in ins]
    o, _ = compressed_attention_triton(*ours, cu, cu_cmp)
    fo, _ = compressed_attention_flex(*flex, cu, cu_cmp)
    do = torch.randn_like(o)
    grads, flex_grads = torch.autograd.grad(o, ours, do), torch.autograd.grad(fo, flex, do)
    for name, a, b in zip(("dq", "dk_cmp", "dv_cmp"), grads, flex_grads):
        assert_close(a, b, BF16, name + " vs flex")


@pytest.mark.gpu
@pytest.mark.parametrize("d", [128, 64, 48])
def test_gpu_compressed_triton_fp32(d):
    ins, cu, cu_cmp = _inputs(_gpu_layout([0, 1000, 1017, 4096]), 2, 3, d, torch.float32, device="cuda")
    _check(ins, cu, cu_cmp, torch.float32)


@pytest.mark.gpu
def test_gpu_compressed_triton_deterministic():
    ins, cu, cu_cmp = _inputs(_gpu_layout(16384), 4, 4, 128, BF16, device="cuda")
    runs = []
    for _ in range(2):
        ours = [t.clone().requires_grad_() for t in ins]
        o, lse = compressed_attention_triton(*ours, cu, cu_cmp)
        runs.append((o, lse) + torch.autograd.grad(o, ours, torch.ones_like(o)))
    assert all(torch.equal(a, b) for a, b in zip(*runs))
