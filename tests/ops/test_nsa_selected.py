"""NSA-specific kernel tests (the shared reference checks of both families are in test_selected.py):
every tuning knob computes the same thing, the dK/dV work list, and on the GPU bf16 at 8K-64K with
bitwise determinism of the backward.
"""
import pytest
import torch

import nsa_baseline
from nsa_baseline.ops import selected_attention
from nsa_baseline.ops.selected_bwd import nsa_selected_bwd
from nsa_baseline.ops.selected_fwd import nsa_selected_fwd
from nsa_baseline.reference import selected_attention_ref
from nsa_baseline.utils.varlen import token_positions
from tests.helpers import assert_close
from tests.ops.cases import CASES, realistic_case
from tests.ops.harness import check_all, reference, run_selected

@pytest.mark.parametrize("case", [CASES[1], CASES[4]], ids=lambda c: c.id)
def test_kernel_knobs_agree(case, device):
    """Every tuning knob computes the same thing: skip branch vs masked slots, tile and warp choices,
    and dK/dV rows split into many chunks (partials + ordered reduce) vs one program per row."""
    x = case.make(torch.float32, device)
    n = x.q.shape[0]
    pos = token_positions(x.cu_seqlens, n)[0].int()
    scale = x.q.shape[-1] ** -0.5
    do = torch.randn_like(x.q)
    base_o, base_lse = nsa_selected_fwd(x.q, x.k, x.v, x.block_indices, x.block_size, scale, pos)
    base = nsa_selected_bwd(x.q, x.k, x.v, base_o, base_lse, do, x.block_indices, x.block_size, scale,
                            x.cu_seqlens, pos)
    o, lse = nsa_selected_fwd(x.q, x.k, x.v, x.block_indices, x.block_size, scale, pos,
                              num_warps=2, num_stages=1, skip_unused=True)
    grads = nsa_selected_bwd(x.q, x.k, x.v, o, lse, do, x.block_indices, x.block_size, scale,
                             x.cu_seqlens, pos, dq_warps=2, dq_stages=1, dkdv_block_m=16, dkdv_warps=2,
                             dkdv_stages=1, dkdv_chunk=32, skip_unused=True)
    for a, b, name in zip((o, lse, *grads), (base_o, base_lse, *base), ("o", "lse", "dq", "dk", "dv")):
        assert_close(a, b, torch.float32, name, tol=1e-6)


@pytest.mark.parametrize("chunk", [16, 48, None])
def test_dkdv_schedule_covers_every_row_once(chunk):
    """Each CSR row is cut into row_chunks chunks, each chunk is one work item, split rows own
    disjoint partial slots inside the buffer bound, and longer rows come first."""
    from nsa_baseline.utils.block_index import build_block_index
    from nsa_baseline.ops.selected_bwd import dkdv_schedule

    case = CASES[1]
    x = case.make(torch.float32, "cpu")
    n, h, t_sel = x.block_indices.shape
    bi = build_block_index(x.block_indices, x.block_size, x.cu_seqlens, h)
    sch = dkdv_schedule(bi, case.group, n * h * t_sel, 16, chunk)
    live = sch.work_row < bi.num_rows
    items = sorted(zip(sch.work_row[live].tolist(), sch.work_chunk[live].tolist()))
    expect = sorted((r, c) for r, nc in enumerate(sch.row_chunks.tolist()) for c in range(nc))
    assert items == expect
    rows = (bi.row_offsets[1:] - bi.row_offsets[:-1]).long() * case.group
    assert (sch.row_chunks.long() == ((rows + sch.chunk - 1) // sch.chunk).clamp(min=1)).all()
    lengths = rows[sch.work_row[live].long()]
    assert (lengths[:-1] >= lengths[1:]).all(), "work items must come longest row first"
    split = sch.row_chunks > 1
    slots = [s for r in split.nonzero().flatten().tolist()
             for s in range(sch.row_slot[r], sch.row_slot[r] + sch.row_chunks[r])]
    assert len(slots) == len(set(slots)) and all(0 <= s < sch.num_slots for s in slots)


def test_package_export():
    assert nsa_baseline.selected_attention is selected_attention


# ---------------------------------------------------------------- GPU: bf16 at realistic sizes
@pytest.mark.gpu
@pytest.mark.parametrize("n,g,bs,t_sel", [(8192, 1, 64, 16), (32768, 4, 64, 16), (65536, 16, 128, 8)],
                         ids=lambda p: str(p))
def test_gpu_bf16_forward(n, g, bs, t_sel):
    q, k, v, idx, _, cu = realistic_case(n, 4, g, 128, t_sel, bs)
    o, lse = selected_attention(q, k, v, idx, bs, cu_seqlens=cu, return_lse=True, check_indices=False)
    ro, rl = selected_attention_ref(q.float(), k.float(), v.float(), idx, bs, cu_seqlens=cu, return_lse=True)
    assert_close(o, ro, torch.bfloat16, "o")
    assert_close(lse, rl, torch.bfloat16, "lse")


@pytest.mark.gpu
@pytest.mark.parametrize("g,d,bs", [(1, 128, 64), (3, 96, 32), (16, 128, 128), (4, 256, 64)],
                         ids=lambda p: str(p))
def test_gpu_bf16_backward_deterministic(g, d, bs):
    xi = realistic_case(8192, 2, g, d, 8, bs, seqlens=[3000, 77, 5115])
    do = torch.randn_like(xi.q)
    out1 = run_selected(selected_attention, xi, do, check_indices=True)
    out2 = run_selected(selected_attention, xi, do, check_indices=False)
    for a, b, name in zip(out1, out2, ("o", "lse", "dq", "dk", "dv")):
        assert torch.equal(a, b), f"{name} differs between two identical runs"
    check_all(out1, reference(xi, do, ref_dtype=torch.float32), torch.bfloat16)
