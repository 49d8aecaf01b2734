"""NSA's local blocks through the window kernels (fused_attention.LOCAL_BLOCKS_KERNEL, issue #14 item 5).

CPU (Triton interpreter, fp32): the window kernels' block-local mode equals selected attention over the
local blocks alone (forward, lse, and dq / dk / dv with an lse and delta of a wider softmax, as the
module uses them); build_block_index(skip_local=) drops exactly those pairs; the FSA reduction's extra
partial merges like one more block; the module with the switch on equals it off (fwd + every gradient),
varlen with odd lengths, G = 1 and 3. GPU (`-m gpu`): the same module equality in bf16 at 8K.
"""
import pytest
import torch

from nsa_baseline import fused_attention
from nsa_baseline.ops.window_triton import launch_configs, token_tables, window_bwd, window_fwd
from nsa_baseline.reference.selected import selected_attention_ref
from nsa_baseline.utils.block_index import build_block_index
from nsa_baseline.utils.varlen import token_positions
from tests.helpers import rel_err
from tests.ops.test_fused_backward import check_grads, fwd_bwd, inputs, make_module

CU = [0, 5, 37, 40, 91]  # odd lengths; sequence starts off the block grid
BS = 16


def local_indices(cu, n, h, local):
    """[N, H, local] the local blocks ending at each token's block (-1 below block 0)."""
    pos = token_positions(cu, n)[0].long()
    blocks = (pos // BS)[:, None] - torch.arange(local - 1, -1, -1)[None, :]
    return torch.where(blocks >= 0, blocks, -1).int()[:, None, :].expand(n, h, local).contiguous()


@pytest.mark.parametrize("local", [1, 2, 3])
@pytest.mark.parametrize("hq,h", [(2, 2), (6, 2)], ids=["g1", "g3"])
def test_block_local_window_equals_selected_over_the_local_blocks(local, hq, h):
    torch.manual_seed(local)
    n, d = CU[-1], 16
    cu = torch.tensor(CU, dtype=torch.int32)
    q, k, v = torch.randn(n, hq, d), torch.randn(n, h, d), torch.randn(n, h, d)
    scale = d ** -0.5
    tables, cfgs = token_tables(cu, n, q.device), launch_configs(d, q.dtype)
    o, lse = window_fwd(q, k, v, tables, local, scale, cfgs.fwd, block_local=BS)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    o_ref, lse_ref = selected_attention_ref(*leaves, local_indices(cu, n, h, local), BS, cu_seqlens=cu,
                                            return_lse=True)
    assert rel_err(o, o_ref) < 1e-5 and rel_err(lse, lse_ref) < 1e-5
    do = torch.randn_like(o)
    o_ref.backward(do)
    dq, dk, dv = window_bwd(q, k, v, o, lse, do, None, tables, local, scale, cfgs, block_local=BS)
    for name, got, want in zip(("dq", "dk", "dv"), (dq, dk, dv), (t.grad for t in leaves)):
        assert rel_err(got, want) < 1e-5, name


def test_block_local_backward_with_a_wider_softmax():
    """The module passes the whole selected branch's (o, lse, delta): the window kernels then give the
    local keys' share of that softmax's gradient, the same as the reference over all selected blocks
    restricted to the local keys' contribution (checked through dk / dv of keys only local rows see)."""
    torch.manual_seed(0)
    n, hq, h, d, local = CU[-1], 2, 1, 16, 1
    cu = torch.tensor(CU, dtype=torch.int32)
    q, k, v = torch.randn(n, hq, d), torch.randn(n, h, d), torch.randn(n, h, d)
    pos = token_positions(cu, n)[0].long()
    first = torch.where(pos // BS >= 1, torch.zeros_like(pos), -1)  # block 0 too, where it is not local
    idx = torch.stack([first.int(), (pos // BS).int()], -1)[:, None, :].contiguous()  # [N, 1, 2]
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    o_all, lse_all = selected_attention_ref(*leaves, idx, BS, cu_seqlens=cu, return_lse=True)
    do = torch.randn_like(o_all)
    o_all.backward(do)
    tables, cfgs = token_tables(cu, n, q.device), launch_configs(d, q.dtype)
    dq_loc, dk_loc, dv_loc = window_bwd(q, k, v, o_all.detach(), lse_all.detach(), do, None, tables, local,
                                        d ** -0.5, cfgs, block_local=BS)
    # keys outside every sequence's block 0 are seen only as local keys: their dk / dv are all local
    only_local = pos >= BS
    assert rel_err(dk_loc[only_local], leaves[1].grad[only_local]) < 1e-5
    assert rel_err(dv_loc[only_local], leaves[2].grad[only_local]) < 1e-5


def test_skip_local_drops_exactly_the_local_pairs():
    torch.manual_seed(0)
    n, h, t, local = CU[-1], 2, 4, 2
    cu = torch.tensor(CU, dtype=torch.int32)
    pos = token_positions(cu, n)[0].long()
    idx = torch.randint(-1, 6, (n, h, t), dtype=torch.int32)
    full = build_block_index(idx, BS, cu, h)
    skip = build_block_index(idx, BS, cu, h, skip_local=local)
    cur = (pos // BS)[:, None, None]
    is_local = (idx.long() > cur - local) & (idx.long() <= cur)
    kept = full.pair_pos >= 0
    assert torch.equal(skip.pair_pos >= 0, kept & ~is_local)
    assert int(skip.row_offsets[-1]) == int((kept & ~is_local).sum())


@pytest.mark.parametrize("compression", ["mean", "linear"])
@pytest.mark.parametrize("hq,h", [(1, 1), (3, 1)], ids=["g1", "g3"])
def test_module_with_local_blocks_kernel_equals_without(compression, hq, h, monkeypatch):
    kw = dict(topk=4, local_blocks=2, init_blocks=1)
    m = make_module("fsa", hq, h, compression, **kw)
    ins, cu = inputs(hq, h)
    monkeypatch.setattr(fused_attention, "LOCAL_BLOCKS_KERNEL", False)
    want = fwd_bwd(m, ins, cu)
    monkeypatch.setattr(fused_attention, "LOCAL_BLOCKS_KERNEL", True)
    assert fused_attention._local_blocks("fsa", m._fused_config(m.branches())) == 2
    got = fwd_bwd(m, ins, cu)
    check_grads(got, want, 2e-5, f"local blocks {compression} hq={hq}")


def test_local_blocks_kernel_leaves_the_nsa_family_alone(monkeypatch):
    monkeypatch.setattr(fused_attention, "LOCAL_BLOCKS_KERNEL", True)
    m = make_module("nsa", 3, 1, "mean", topk=4, local_blocks=2)
    assert fused_attention._local_blocks("nsa", m._fused_config(m.branches())) == 0


@pytest.mark.gpu
@pytest.mark.parametrize("g", [1, 4])
def test_gpu_module_with_local_blocks_kernel_bf16(g, monkeypatch):
    """bf16, 8K tokens, 64 query heads, the paper's (64, 16) sizes: on equals off to bf16 rounding."""
    from nsa_baseline.module import NativeSparseAttention

    torch.manual_seed(0)
    n, hq, d = 8192, 64, 128
    m = NativeSparseAttention(4096, hq, hq // g, d, backend="fsa").cuda().bfloat16()
    q = torch.randn(n, hq, d, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(n, hq // g, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    gates = torch.rand(n, hq, 3, device="cuda", dtype=torch.bfloat16)
    cu = torch.tensor([0, 3000, n], dtype=torch.int32, device="cuda")
    outs = {}
    for on in (False, True):
        monkeypatch.setattr(fused_attention, "LOCAL_BLOCKS_KERNEL", on)
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        o = m.attention(*leaves, gates, cu)
        o.backward(torch.ones_like(o))
        outs[on] = [o.detach()] + [t.grad for t in leaves]
    for name, a, b in zip(("o", "dq", "dk", "dv"), outs[True], outs[False]):
        assert rel_err(a, b) < 1e-2, name
