"""FSA-specific kernel tests (the shared reference checks of both families are in test_selected.py).

CPU: the Triton interpreter in fp32 and fp16 on FSA's own hard cases (a block chosen by no query,
by every query; head passes under a tiny buffer budget; busy blocks split over several work items),
agreement with NSA, auto. GPU: bf16 at 8K-64K, bitwise determinism.
"""
import pytest
import torch

import fsa
from fsa import auto, tuning
from fsa.selected import selected_attention
from nsa_baseline.ops import selected_attention as nsa_selected_attention
from nsa_baseline.reference import selected_attention_ref
from tests.helpers import assert_close
from tests.ops.cases import CASES, CaseInputs, realistic_case
from tests.ops.harness import check_all, reference, run_selected

DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


def _hot_and_cold_case(dtype, device):
    """Block 1 chosen by no query, block 0 by every query (slot order scrambled), G = 3."""
    n, h, g, d, bs, t_sel = 120, 1, 3, 32, 16, 3
    q, k, v = (torch.randn(n, hh, d, dtype=dtype, device=device) for hh in (h * g, h, h))
    own = torch.arange(n) // bs
    prev = torch.where(own >= 3, own - 1, torch.full_like(own, -1))
    own = torch.where(own == 1, torch.full_like(own, -1), own)  # nobody chooses block 1
    idx = torch.stack([prev, torch.zeros_like(own), own], -1).view(n, 1, t_sel)
    idx = torch.where(idx == torch.roll(idx, 1, -1), -1, idx)  # keep entries distinct
    cu = torch.tensor([0, n], dtype=torch.int32, device=device)
    return CaseInputs(q, k, v, idx.int().to(device), bs, cu)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_block_chosen_by_no_query_and_by_every_query(dtype, device):
    x = _hot_and_cold_case(dtype, device)
    do = torch.randn_like(x.q)
    out = run_selected(selected_attention, x, do, check_indices=True)
    check_all(out, reference(x, do), dtype)
    assert (out[3][16:32] == 0).all() and (out[4][16:32] == 0).all(), "an unchosen block gets zero dK/dV"


def test_head_passes_under_small_buffer_budget(device, monkeypatch):
    """A budget below one pair row: one KV head and one query head per pass (2 x 5 passes),
    dK/dV accumulated across the query-head passes."""
    x = CASES[3].make(torch.float32, device)  # H = 2, G = 5
    do = torch.randn_like(x.q)
    monkeypatch.setenv("FSA_BUFFER_BUDGET_GB", "1e-9")
    check_all(run_selected(selected_attention, x, do), reference(x, do), torch.float32)


@pytest.mark.parametrize("kv_heads,heads", [(1, 2), (2, 2), (1, 5)])
def test_uneven_passes_over_kv_heads_and_query_heads(kv_heads, heads, device, monkeypatch):
    """Forced pass shapes: KV-head passes (partial buffers offset by the pass's first pair), query-head
    passes with a short last one (5 = 2 + 2 + 1), and both at once."""
    x = CASES[3].make(torch.float32, device)  # H = 2, G = 5
    do = torch.randn_like(x.q)
    monkeypatch.setattr(tuning, "pass_split", lambda h, g, bytes_of, budget: (kv_heads, heads))
    check_all(run_selected(selected_attention, x, do), reference(x, do), torch.float32)


KNOB_CONFIGS = {  # (forward, backward): tiles, chunking, reduction widths away from the defaults
    "m32-chunk1": (tuning.LaunchConfig(32, 1, 2, 1, block_n=8), tuning.LaunchConfig(32, 1, 2, 1, key_tile=32)),
    "m16-chunk3": (tuning.LaunchConfig(16, 3, 1, 1, block_n=64),
                   tuning.LaunchConfig(16, 3, 1, 1, block_n=4, key_tile=64, reduce_key_rows=64)),
    "reduce1": (tuning.LaunchConfig(16, 2, 1, 1, block_n=1), tuning.LaunchConfig(16, 1, 1, 1, reduce_key_rows=1)),
    # What a GPU runs at d = 128 (64-row forward tiles, 3 stages), here on the interpreter's small cases
    "gpu-defaults": tuple(tuning.gpu_launch_config(128, 64, backward) for backward in (False, True)),
}


@pytest.mark.parametrize("knobs", KNOB_CONFIGS.values(), ids=KNOB_CONFIGS.keys())
@pytest.mark.parametrize("case", [CASES[1], CASES[6]], ids=lambda c: c.id)  # sequences under a block; BS 64
def test_every_launch_config_computes_the_same(knobs, case, device):
    """Launch knobs change tiling, not results: work items of 1-3 tiles, reduction programs of 1-64
    tokens, key tiles and dK/dV reduction slices larger than the block (clamped to it)."""
    x = case.make(torch.float32, device)
    do = torch.randn_like(x.q)
    with tuning.launch_config_override(*knobs):
        out = run_selected(selected_attention, x, do, check_indices=True)
    check_all(out, reference(x, do), torch.float32)


def test_launch_config_rejects_tiles_triton_cannot_build():
    with pytest.raises(ValueError, match="block_m must be a power of two >= 16"):
        tuning.LaunchConfig(24, 1, 4, 2)
    with pytest.raises(ValueError, match="reduce_key_rows must be a power of two >= 1"):
        tuning.LaunchConfig(32, 1, 4, 2, reduce_key_rows=12)
    with pytest.raises(ValueError, match="chunk_tiles must be >= 1"):
        tuning.LaunchConfig(32, 0, 4, 2)


def test_gpu_forward_defaults_follow_shared_memory():
    """The swept 64-row, 3-stage forward only where Hopper's shared memory backs it; less shared
    memory (A100: 163 KiB) or d > 128 keeps the earlier estimate (32 rows for 128 x 128 K/V blocks)."""
    swept = tuning.gpu_launch_config(128, 128, backward=False)
    assert (swept.block_m, swept.num_stages) == (64, 3)
    a100 = tuning.gpu_launch_config(128, 128, backward=False, shared_mem=163 * 1024)
    assert (a100.block_m, a100.num_stages) == (32, 2)
    assert tuning.gpu_launch_config(128, 64, backward=False, shared_mem=163 * 1024).block_m == 64
    assert tuning.gpu_launch_config(256, 64, backward=False).block_m == 32
    assert tuning.device_shared_mem(None) == tuning.device_shared_mem("cpu") == tuning.HOPPER_SHARED_MEM


@pytest.mark.gpu
def test_gpu_device_shared_mem_reads_the_device():
    shared = tuning.device_shared_mem(torch.device("cuda"))
    assert shared >= 48 * 1024
    if any(name in torch.cuda.get_device_name() for name in ("H100", "H200", "H20")):
        assert shared >= tuning.HOPPER_SHARED_MEM  # else the swept forward default would not apply


@pytest.mark.parametrize("h,g,budget,split", [
    (4, 3, 1e12, (4, 3)),  # one pass
    (4, 3, 1000, (3, 3)),  # whole groups, KV heads split
    (4, 3, 350, (1, 3)),
    (2, 8, 700, (2, 3)),  # one KV head's group does not fit: all KV heads, part of each group
    (4, 3, 250, (2, 1)),  # not even one query head of every KV head: KV heads split, one query head
    (4, 3, 50, (1, 1)),  # nothing fits: the smallest pass
])
def test_pass_split_prefers_whole_groups(h, g, budget, split):
    assert tuning.pass_split(h, g, lambda kv_heads, heads: 100 * kv_heads * heads, budget) == split


def test_buffer_budget_from_env_else_free_memory(monkeypatch):
    monkeypatch.setenv("FSA_BUFFER_BUDGET_GB", "0.5")
    assert tuning.buffer_budget_bytes(torch.device("cpu")) == 0.5 * 2**30
    monkeypatch.delenv("FSA_BUFFER_BUDGET_GB")
    # no device memory to share
    assert tuning.buffer_budget_bytes(torch.device("cpu")) == tuning.DEFAULT_BUDGET_GB * 2**30


def test_buffer_budget_asks_the_device_outside_graph_capture_only(monkeypatch):
    """A CUDA graph capture may not query the device: the budget of the last call is reused."""
    free = [40 * 2**30]
    capturing = [False]
    monkeypatch.delenv("FSA_BUFFER_BUDGET_GB", raising=False)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i: (free[0], 80 * 2**30))
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing[0])
    monkeypatch.setattr(tuning, "_last_budget", {})
    cuda0 = torch.device("cuda", 0)
    assert tuning.buffer_budget_bytes(cuda0) == 10 * 2**30
    free[0], capturing[0] = 8 * 2**30, True
    assert tuning.buffer_budget_bytes(cuda0) == 10 * 2**30  # not asked while capturing
    capturing[0] = False
    assert tuning.buffer_budget_bytes(cuda0) == tuning.DEFAULT_BUDGET_GB * 2**30  # 25% of 8 GiB < 2.5 GiB


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "bwd"])
@pytest.mark.parametrize("seqlen", [131072, 262144])
def test_long_context_g1_plan_fits_default_budget(seqlen, backward, monkeypatch):
    """Tables 6-7's worst case (64 KV heads, g = 1, (64, 16)): the partial buffers of a pass stay
    within the default budget (they needed 34 GiB at 128K before KV-head passes)."""
    monkeypatch.delenv("FSA_BUFFER_BUDGET_GB", raising=False)
    monkeypatch.setattr(tuning, "is_interpreter", lambda: False)  # the GPU launch configs
    q = torch.empty(seqlen, 64, 128, dtype=torch.bfloat16, device="meta")
    plan = tuning.launch_plan(q, q, 64, 16, backward)
    assert plan.heads_per_pass == 1 and plan.kv_heads_per_pass < 64
    used = tuning.pass_bytes(seqlen, 16, plan.kv_heads_per_pass, 1, 128, 128, 2, 64, plan.cfg, backward)
    assert used <= tuning.DEFAULT_BUDGET_GB * 2**30
    assert sum(hcur * gcur for _, hcur, _, gcur in plan.passes()) == 64


@pytest.mark.parametrize("case", [CASES[1], CASES[5]], ids=lambda c: c.id)
def test_same_answer_as_nsa(case, device):
    x = case.make(torch.float32, device)
    do = torch.randn_like(x.q)
    check_all(run_selected(selected_attention, x, do), run_selected(nsa_selected_attention, x, do),
              torch.float32, tol=1e-5)


def test_auto_dispatches_to_a_family(device):
    x = CASES[0].make(torch.float32, device)
    do = torch.randn_like(x.q)
    check_all(run_selected(auto.selected_attention, x, do), reference(x, do), torch.float32)
    assert [auto.rule_choice(g) for g in (1, 5, 8, 16)] == ["fsa", "fsa", "fsa", "nsa"]


def test_package_export():
    assert fsa.selected_attention is selected_attention


# ---------------------------------------------------------------- GPU: bf16 at realistic sizes
@pytest.mark.gpu
@pytest.mark.parametrize("n,g,d,bs,t_sel,nsa_indices",
                         [(8192, 1, 128, 64, 16, True), (16384, 4, 128, 128, 8, True), (65536, 1, 128, 64, 16, True),
                          (8192, 5, 96, 32, 8, False), (8192, 2, 256, 64, 16, False)], ids=str)
def test_gpu_bf16_matches_reference_and_is_deterministic(n, g, d, bs, t_sel, nsa_indices):
    x = realistic_case(n, 4 if n <= 16384 else 2, g, d, t_sel, bs, nsa_indices=nsa_indices)
    do = torch.randn_like(x.q)
    out1 = run_selected(selected_attention, x, do, check_indices=True)
    out2 = run_selected(selected_attention, x, do, check_indices=False)
    for a, b, name in zip(out1, out2, ("o", "lse", "dq", "dk", "dv")):
        assert torch.equal(a, b), f"{name} differs between two identical runs"
    check_all(out1, reference(x, do, ref_dtype=torch.float32), torch.bfloat16)


@pytest.mark.gpu
def test_gpu_bf16_varlen():
    x = realistic_case(8192, 2, 3, 128, 16, 64, seqlens=[3000, 77, 5115])
    do = torch.randn_like(x.q)
    check_all(run_selected(selected_attention, x, do), reference(x, do, ref_dtype=torch.float32), torch.bfloat16)
    o = selected_attention_ref(x.q.float(), x.k.float(), x.v.float(), x.block_indices, 64, cu_seqlens=x.cu_seqlens)
    assert_close(selected_attention(x.q, x.k, x.v, x.block_indices, 64, cu_seqlens=x.cu_seqlens), o,
                 torch.bfloat16, "o")


@pytest.mark.gpu
def test_gpu_a_new_pass_split_compiles_nothing(monkeypatch):
    """The pass split follows free memory, so it changes between calls of one run. Forward and backward
    under one pass over all 4 KV heads, then passes of 1 and of 3 heads: the later passes start
    `row_offsets` 130 or 390 int32 rows in (not 16-byte aligned) and have other row counts and offsets, none
    of which may compile a new kernel variant (sweep=generate's eager prefill paid ~2 s a variant)."""
    from triton import knobs

    x = realistic_case(8192, 4, 2, 128, 16, 64)  # 8192 / 64 + 2 = 130 CSR rows per KV head
    do = torch.randn_like(x.q)
    compiled = []
    monkeypatch.setattr(knobs.runtime, "jit_post_compile_hook",
                        lambda *a, **k: compiled.append(k["fn"].name))
    for split in [(4, 2), (1, 2), (3, 2)]:  # the query heads per pass (a constexpr) stay 2
        monkeypatch.setattr(tuning, "pass_split", lambda h, g, bytes_of, budget, s=split: s)
        before = len(compiled)
        out = run_selected(selected_attention, x, do)
        if split != (4, 2):  # the first split compiles the kernels
            assert compiled[before:] == [], f"split {split} compiled {compiled[before:]}"
    check_all(out, reference(x, do, ref_dtype=torch.float32), torch.bfloat16)
