"""The decode kernels (one new token per slot; nsa_baseline/ops/decode_*.py, inference/decode.py):
every step of a multi-step decode equals the PyTorch cached path and the module's full forward, from
slots of different lengths (0 history -> the first token; summary, block and window boundaries
crossed one token at a time), g = 1, 3, 5, 16, both compressions. The selection kernel alone against
the reference mapping + top-T (sets equal up to exact ties, forced blocks present, -1 past the causal
blocks), its FlashDecoding split forced to S = 2, 3, 5; the attend kernel's split (forced) against
S = 1 and a float64 reference, and one step test with both splits forced; the append kernel's column
tiles and kernel chunks against compress_spans (lengths moved once per step, by the attend kernel in
a step); bad calls, and on CUDA bf16 at realistic sizes and CUDA-graph replay == eager."""
import copy
import dataclasses

import pytest
import torch

from nsa_baseline.inference.cached_attention import gathered_attention
from nsa_baseline.inference.decode import decode_step
from nsa_baseline.inference.step import forward_with_cache
from nsa_baseline.module import NativeSparseAttention
from nsa_baseline.ops.compression import compress_spans
from nsa_baseline.ops.decode_append import decode_append
from nsa_baseline.ops.decode_attend import decode_selected_window
from nsa_baseline.ops.decode_select import decode_compressed_select
from nsa_baseline.ops.decode_tiles import DECODE_LAUNCH, decode_launch
from nsa_baseline.reference.compressed import summaries_to_blocks
from nsa_baseline.utils.compressed_varlen import visible_compressed
from tests.helpers import assert_close
from tests.inference.schedules import packed

# summary every 4 tokens from token 8, block of 16, window 12: boundaries come every few steps
SMALL = dict(kernel_size=8, kernel_stride=4, block_size=16, topk=3, init_blocks=1, local_blocks=1, window_size=12)
HIDDEN = 32


def small_module(g, h=2, d=16, compression="linear", backend="nsa", dtype=torch.float32, device="cpu", **kw):
    torch.manual_seed(0)
    m = NativeSparseAttention(HIDDEN, g * h, h, d, compression=compression, backend=backend, **{**SMALL, **kw})
    if compression == "linear":  # away from the mean-pooling init so the weights matter
        with torch.no_grad():
            for p in (m.k_cmp_weight, m.v_cmp_weight, m.k_cmp_pos, m.v_cmp_pos):
                p.add_(0.1 * torch.randn_like(p))
    return m.to(device=device, dtype=dtype)


def torch_twin(m, dtype=None):
    """The same module (weights, sizes) on the PyTorch backend: the full-forward oracle (float64) and
    a fast prefill (the interpreter runs the kernel backends' prefill slowly)."""
    twin = copy.deepcopy(m)
    twin.backend, twin._backend = "torch", None
    return twin if dtype is None else twin.to(dtype)


def decode_and_compare(m, prefill, steps, max_seqlen, tol=None, **cache_kw):
    """Prefill slots to `prefill` tokens, then `steps` decode calls; each call's outputs through the
    decode kernels must equal the PyTorch path (a copy of the cache) and the full forward's rows (of
    the PyTorch backend in float64 on CPU, else in m's dtype), and the two caches must end equal.
    cache_kw: new_cache's (page_size, num_pages: a paged cache)."""
    dtype, dev = m.q_proj.weight.dtype, m.q_proj.weight.device
    seqs = [torch.randn(n + steps, m.hidden_size, dtype=dtype, device=dev) for n in prefill]
    lens = [s.shape[0] for s in seqs]
    oracle = torch_twin(m, torch.float64) if dev.type == "cpu" else m
    with torch.no_grad():
        full = oracle(torch.cat(seqs).to(oracle.q_proj.weight.dtype), packed(lens).to(dev))
    start = packed(lens).tolist()
    fast = m.new_cache(len(seqs), max_seqlen, **cache_kw)
    if any(prefill):
        filler = torch_twin(m) if dev.type == "cpu" else m
        forward_with_cache(filler, torch.cat([s[:n] for s, n in zip(seqs, prefill)]), packed(prefill).to(dev), fast)
    slow = copy.deepcopy(fast)
    ones = packed([1] * len(seqs)).to(dev)
    for i in range(steps):
        x = torch.stack([s[n + i] for s, n in zip(seqs, prefill)])
        y = forward_with_cache(m, x, ones, fast)
        y_torch = forward_with_cache(m, x, ones, slow, decode_kernels=False)
        want = torch.stack([full[start[b] + n + i] for b, n in enumerate(prefill)])
        where = f"step {i} after {[n + i for n in prefill]}"
        assert_close(y, y_torch, dtype, f"{where}: decode kernels vs PyTorch path", tol=tol)
        assert_close(y, want, dtype, f"{where}: decode kernels vs full forward", tol=tol)
        assert fast.host_lengths == slow.host_lengths == tuple(fast.lengths.tolist())
    for name in ("k_cmp", "v_cmp", "k", "v"):
        assert_close(getattr(fast, name), getattr(slow, name), dtype, f"cache.{name}", tol=tol)
    return fast


# Both compressions at g = 1 and 5, one each at 3 and 16 (the interpreter costs ~8 s per case; the
# compression path does not depend on g).
@pytest.mark.parametrize("g,compression", [(1, "linear"), (1, "mean"), (3, "mean"), (5, "linear"), (5, "mean"),
                                           (16, "linear")])
def test_decode_steps_equal_pytorch_path_and_full_forward(g, compression):
    """Slots prefilled to 0, 37 and 90 tokens (0 -> first token through the kernels; 37 and 90 cross a
    summary every 4 steps and blocks 48 / 96; 7 blocks for T = 3), 12 decode steps."""
    decode_and_compare(small_module(g, compression=compression), [0, 37, 90], 12, max_seqlen=112)


def force_attend_splits(monkeypatch, splits):
    """The step's attend kernel splits over `splits` programs per (slot, KV head) (the rule gives 1 in
    the interpreter): the split and combine kernels, the combine kernel moving the lengths."""
    import nsa_baseline.ops.decode_attend as attend

    monkeypatch.setattr(attend, "attend_splits", lambda *a: splits)


def test_decode_from_an_empty_cache_and_shorter_than_a_summary():
    """Every slot starts empty: the first tokens see no summary (o_cmp = 0) until token 8."""
    decode_and_compare(small_module(5, h=1, init_blocks=0, local_blocks=2, window_size=20), [0, 0], 11, max_seqlen=16)


def test_decode_forced_blocks_and_long_window_split(monkeypatch):
    """init 2 + local 2 of T = 5 (forced blocks fill most of the set), window longer than the history;
    the attend kernel split forced to S = 3 (5 blocks + 2 window tiles: items 0-2 / 3-5 / 6)."""
    force_attend_splits(monkeypatch, 3)
    decode_and_compare(small_module(3, topk=5, init_blocks=2, local_blocks=2, window_size=128), [5, 70], 8,
                       max_seqlen=80)


@pytest.mark.parametrize("attend", [3, 1])
def test_decode_step_folds_the_select_merge_into_the_attend_kernels(monkeypatch, attend):
    """Both kernels split (select S = 3 forced, attend S = 3): the step launches no merge kernel, the
    attend kernel takes the top T of the select pass's candidate sets and the combine merges the
    compressed partials; with the attend kernel unsplit the partials are merged first. Same steps as
    the full forward and the PyTorch path (T = 5: not a power of two; -1 entries on short histories)."""
    import nsa_baseline.ops.decode_attend as attend_mod
    import nsa_baseline.ops.decode_select as sel

    force_attend_splits(monkeypatch, attend)
    monkeypatch.setattr(sel, "decode_splits", lambda *a: 3)
    merges = []
    for mod in (sel, attend_mod):
        real = mod.split_merge
        monkeypatch.setattr(mod, "split_merge", lambda *a, _real=real: merges.append(1) or _real(*a))
    decode_and_compare(small_module(3, topk=5, init_blocks=1, local_blocks=2, window_size=20), [0, 37, 70], 5,
                       max_seqlen=80)
    assert len(merges) == (0 if attend > 1 else 5)  # the PyTorch-path twin runs no kernel
    with decode_launch(fold_merge=0):
        decode_and_compare(small_module(3, topk=5, init_blocks=1, local_blocks=2, window_size=20), [37], 2,
                           max_seqlen=80)
    assert len(merges) == (2 if attend > 1 else 7)


def test_selected_window_refuses_partials_of_another_shape():
    q, k = torch.randn(2, 4, 16), torch.randn(2, 32, 2, 16)
    pos = torch.tensor([20, 31], dtype=torch.int32)
    kc = torch.randn(2, 8, 2, 16)
    _, parts = decode_compressed_select(q, kc, kc, pos, 8, 4, 16, 3, 1, 1, 0.25, splits=2, unmerged=True)
    gates = torch.rand(2, 4, 3)
    with pytest.raises(ValueError, match="`block_indices`"):
        decode_selected_window(q, k, k, pos, parts, torch.zeros(2, 4, 16), gates, 16, 8, 0.25)
    with pytest.raises(ValueError, match="`block_indices`"):
        decode_selected_window(q[:1], k[:1], k[:1], pos[:1], parts, None, gates[:1], 16, 8, 0.25)


def test_decode_step_api_checks_on_the_host_mirror():
    m = small_module(3)
    cache = m.new_cache(2, 10)
    forward_with_cache(m, torch.randn(9, HIDDEN), packed([9, 0]), cache)
    with pytest.raises(ValueError, match="`x`"):  # one token per slot
        decode_step(m, torch.randn(3, HIDDEN), cache)
    y = decode_step(m, torch.randn(2, HIDDEN), cache)
    assert y.shape == (2, HIDDEN) and cache.host_lengths == (10, 1) and cache.lengths.tolist() == [10, 1]
    with pytest.raises(ValueError, match="`x`: slot 0 already holds max_seqlen"):
        decode_step(m, torch.randn(2, HIDDEN), cache)
    assert cache.host_lengths == (10, 1) and cache.lengths.tolist() == [10, 1]
    with pytest.raises(ValueError, match="`cache`"):  # the PyTorch backend has no decode kernels
        decode_step(small_module(3, backend="torch"), torch.randn(2, HIDDEN), small_module(3, backend="torch")
                    .new_cache(2, 10))


def _reference_selection(q, k_cmp, v_cmp, pos, ks, st, bs, topk, init, local, scale):
    """o_cmp and the rank key of every block (forced +inf, other causal blocks their score, later
    blocks -inf) from the PyTorch path's gathered attention and the reference mapping."""
    b, hq, d = q.shape
    h = k_cmp.shape[2]
    p64 = pos.long()
    width = max(1, k_cmp.shape[1])
    cmp_pos = torch.arange(width).expand(b, h, width)
    vis = cmp_pos < visible_compressed(p64, ks, st)[:, None, None]
    o, _, p = gathered_attention(q.double(), k_cmp.double(), v_cmp.double(), torch.arange(b), cmp_pos, vis, scale)
    nb = int(p64.max()) // bs + 1
    score = summaries_to_blocks(p.sum(dim=2), ks, st, bs, nb)  # [B, H, NB]
    blocks = torch.arange(nb)[None, None, :]
    cur = (p64 // bs)[:, None, None]
    forced = (blocks <= cur) & ((blocks < init) | (blocks > cur - local))
    key = torch.where(forced, float("inf"), torch.where(blocks <= cur, score, float("-inf")))
    return o, key


@pytest.mark.parametrize("case", ["random", "peaked", "one_repeated_summary"])
@pytest.mark.parametrize("g", [1, 5])
def test_select_kernel_against_reference(g, case):
    """Slots at positions 0 (no summary), 7 (first block only), 50, 141 and 255 (16 blocks); T = 5 with
    2 forced; 'one_repeated_summary' makes every score tie (the ranks must still agree)."""
    ks, st, bs, topk, init, local, h, d = 8, 4, 16, 5, 1, 1, 2, 16
    pos = torch.tensor([0, 7, 50, 141, 255], dtype=torch.int32)
    b, max_cmp = pos.numel(), (256 - ks) // st + 1
    q = torch.randn(b, g * h, d) * (6.0 if case == "peaked" else 1.0)
    k_cmp, v_cmp = torch.randn(b, max_cmp, h, d), torch.randn(b, max_cmp, h, d)
    if case == "one_repeated_summary":
        k_cmp[:] = k_cmp[:, :1]
    scale = d ** -0.5
    o_cmp, idx = decode_compressed_select(q, k_cmp, v_cmp, pos, ks, st, bs, topk, init, local, scale)
    o_ref, key = _reference_selection(q, k_cmp, v_cmp, pos, ks, st, bs, topk, init, local, scale)
    assert_close(o_cmp, o_ref, torch.float32, "o_cmp")
    assert o_cmp[0].abs().max() == 0  # position 0 sees no summary
    _assert_selection(idx, key, pos, bs, topk)


def _assert_selection(idx, key, pos, bs, topk, rtol=1e-5):
    """idx [B, H, T] holds the top-T of the reference rank keys (forced first, -1 past the causal
    blocks, scores equal up to rounding: exact ties may pick either block)."""
    b, h = idx.shape[:2]
    for s in range(b):
        for hh in range(h):
            got = idx[s, hh]
            causal = int(pos[s]) // bs + 1
            n_sel = min(topk, causal)
            assert (got[n_sel:] == -1).all() and (got[:n_sel] >= 0).all(), (s, hh, got)
            chosen = got[:n_sel].long()
            assert chosen.unique().numel() == n_sel and (chosen < causal).all()
            row = key[s, hh]
            forced = torch.nonzero(row == float("inf")).flatten()
            assert set(forced.tolist()) <= set(chosen.tolist()), "forced blocks missing"
            want = row.topk(n_sel).values
            torch.testing.assert_close(row[chosen].sort(descending=True).values, want, rtol=rtol, atol=1e-7)


SPLIT_POS = [0, 7, 50, 141, 255]  # no summary, one block (< S splits), 4 blocks, 9 and 16 blocks


def _split_inputs(g, ks, st, seed=0):
    torch.manual_seed(seed)
    h, d = 1, 16
    pos = torch.tensor(SPLIT_POS, dtype=torch.int32)
    b, max_cmp = pos.numel(), (256 - ks) // st + 1
    return pos, torch.randn(b, g * h, d), torch.randn(b, max_cmp, h, d), torch.randn(b, max_cmp, h, d)


@pytest.mark.parametrize("splits,topk", [(2, 2), (3, 5), (5, 5)])
def test_select_kernel_split_equals_one_program_and_reference(splits, topk):
    """FlashDecoding split of the summaries over S programs (forced; the interpreter's rule is S = 1):
    the same o_cmp and the same blocks as S = 1 and the reference, from slots with no summary or fewer
    blocks than splits (empty splits) to 16 blocks; T = 2 (the two forced blocks only) and 5."""
    ks, st, bs, init, local = 8, 4, 16, 1, 1
    pos, q, k_cmp, v_cmp = _split_inputs(3, ks, st)
    args = (q, k_cmp, v_cmp, pos, ks, st, bs, topk, init, local, 0.25)
    o1, idx1 = decode_compressed_select(*args, splits=1)
    o_s, idx_s = decode_compressed_select(*args, splits=splits)
    assert_close(o_s, o1, torch.float32, f"o_cmp, {splits} splits vs 1")
    assert torch.equal(idx_s, idx1), (idx_s, idx1)
    o_ref, key = _reference_selection(*args)
    assert_close(o_s, o_ref, torch.float32, "o_cmp vs reference")
    _assert_selection(idx_s, key, pos, bs, topk)


@pytest.mark.parametrize("splits", [5])
def test_select_kernel_split_boundary_block_wins_by_its_spill(splits):
    """kernel_size 4 x stride: the last summary of a block gives 3/4 of its mass to the next block. A
    peaked key there makes every split's FIRST block the top non-forced block, scored only by the
    previous split's summaries: the spill must cross the split boundary."""
    ks, st, bs, topk, init, local = 16, 4, 16, 4, 0, 1
    pos, q, k_cmp, v_cmp = _split_inputs(2, ks, st, seed=1)
    for b, p in enumerate(SPLIT_POS):
        nblk = p // bs + 1
        chunk = -(-nblk // splits)
        for j in range(chunk, nblk, chunk):  # each split's first block j: peak at summary j * R - 1
            k_cmp[b, j * (bs // st) - 1] = 4.0 * q[b].mean(dim=0)
    args = (q, k_cmp, v_cmp, pos, ks, st, bs, topk, init, local, 0.25)
    o_s, idx_s = decode_compressed_select(*args, splits=splits)
    o_ref, key = _reference_selection(*args)
    assert_close(o_s, o_ref, torch.float32, "o_cmp vs reference")
    _assert_selection(idx_s, key, pos, bs, topk)
    nblk = SPLIT_POS[-1] // bs + 1
    first = -(-nblk // splits)  # split 1's first block is among the chosen of the longest slot
    assert first in idx_s[-1, 0].tolist(), idx_s[-1]


def _reference_selected_window(q, k, v, pos, idx, o_cmp, gates, bs, window, scale):
    """g0 * o_cmp + g1 * softmax over the chosen blocks' keys <= t + g2 * softmax over the window, in
    float64 per (slot, KV head)."""
    b, hq, d = q.shape
    h = k.shape[2]
    g = hq // h
    out = torch.empty(b, hq, d, dtype=torch.float64)
    for s in range(b):
        t = int(pos[s])
        for hh in range(h):
            qq = q[s, hh * g:(hh + 1) * g].double()
            slc = [r for blk in idx[s, hh].tolist() if blk >= 0 for r in range(blk * bs, blk * bs + bs) if r <= t]
            branches = []
            for rows in (torch.tensor(slc, dtype=torch.long), torch.arange(max(0, t - window + 1), t + 1)):
                kk, vv = k[s, rows, hh].double(), v[s, rows, hh].double()
                att = torch.softmax(qq @ kk.T * scale, dim=-1) @ vv if rows.numel() else torch.zeros_like(qq)
                branches.append(att)
            gg = gates[s, hh * g:(hh + 1) * g].double()
            out[s, hh * g:(hh + 1) * g] = (gg[:, :1] * o_cmp[s, hh * g:(hh + 1) * g].double()
                                           + gg[:, 1:2] * branches[0] + gg[:, 2:] * branches[1])
    return out


@pytest.mark.parametrize("shares", [0, 1])
@pytest.mark.parametrize("splits", [3, 7])
def test_attend_kernel_split_equals_one_program_and_reference(splits, shares):
    """FlashDecoding split of selected blocks + window tiles (T = 5 blocks, window 100 = 2 tiles: 7
    items) over S programs (forced). Runs of items (shares=0): 3 -> 3 items each (split 1 holds both
    branches), 7 -> 1 (splits holding one branch only, or only -1 blocks); shares of both branches
    (shares=1): 3 -> 2 blocks + 1 tile each (split 2 no window tile), 7 -> 5 splits, the last ones
    with no window tile. Slots at positions 0 (one key), 7, 50, 141, 255, -1 entries, g = 3. The
    combine kernel sets the lengths to pos + 1."""
    bs, window, topk, h, g, d = 16, 100, 5, 2, 3, 16
    pos = torch.tensor(SPLIT_POS, dtype=torch.int32)
    b = pos.numel()
    q, k, v = torch.randn(b, g * h, d), torch.randn(b, 256, h, d), torch.randn(b, 256, h, d)
    o_cmp, gates = torch.randn(b, g * h, d), torch.rand(b, g * h, 3)
    idx = torch.full((b, h, topk), -1, dtype=torch.int32)
    for s, t in enumerate(SPLIT_POS):
        for hh in range(h):
            n = min(topk - hh, t // bs + 1)  # head 1 keeps its last entry -1
            idx[s, hh, :n] = torch.randperm(t // bs + 1)[:n].int()
    args = (q, k, v, pos, idx, o_cmp, gates, bs, window, 0.25)
    lengths = pos.clone()
    o1 = decode_selected_window(*args, splits=1)
    with decode_launch(attend_shares=shares):
        o_s = decode_selected_window(*args, splits=splits, advance=lengths)
    assert lengths.tolist() == [t + 1 for t in SPLIT_POS]
    assert_close(o_s, o1, torch.float32, f"{splits} splits vs 1")
    assert_close(o_s, _reference_selected_window(*args), torch.float32, f"{splits} splits vs reference")


@pytest.mark.parametrize("splits", [1, 3])
def test_decode_with_the_window_branch_launched_early(monkeypatch, splits):
    """DECODE_LAUNCH.window_stream: the window branch as its own launch after kernel 1's summary pass
    (a side stream on CUDA, in order here), the selected branch after the selection, one combine:
    the same steps as the full forward and the PyTorch path, with 1 and 3 splits per (slot, KV head)."""
    force_attend_splits(monkeypatch, splits)
    calls = []
    import nsa_baseline.inference.decode as decode_mod

    real = decode_mod.decode_window_partials
    monkeypatch.setattr(decode_mod, "decode_window_partials", lambda *a, **k: calls.append(1) or real(*a, **k))
    with decode_launch(window_stream=1):
        decode_and_compare(small_module(3, topk=5, init_blocks=1, local_blocks=2, window_size=20), [0, 37, 70], 6,
                           max_seqlen=80)
    assert len(calls) == 6  # one early window launch per step


def test_window_partials_are_refused_with_slots_or_splits():
    q = torch.randn(2, 4, 16)
    k = torch.randn(2, 32, 2, 16)
    pos = torch.tensor([5, 9], dtype=torch.int32)
    idx = torch.full((2, 2, 3), -1, dtype=torch.int32)
    o_cmp, gates = torch.zeros(2, 4, 16), torch.rand(2, 4, 3)
    from nsa_baseline.ops.decode_attend import decode_window_partials

    wp = decode_window_partials(q, k, k, pos, 3, 16, 8, 0.25)
    with pytest.raises(ValueError, match="window_partials"):
        decode_selected_window(q, k, k, pos, idx, o_cmp, gates, 16, 8, 0.25, splits=2, window_partials=wp)


def test_decode_launch_overrides_are_checked_and_restored():
    """decode_launch() refuses unknown names and non-positive counts (leaving the settings as they
    were), and restores every setting on exit, also when the body raises."""
    before = dataclasses.asdict(DECODE_LAUNCH)
    with pytest.raises(ValueError, match="unknown settings"):
        with decode_launch(select_warp=8):
            pass
    with pytest.raises(ValueError, match="`attend_warps`"):
        with decode_launch(select_warps=8, attend_warps=0):  # the valid one is not applied either
            pass
    assert dataclasses.asdict(DECODE_LAUNCH) == before
    with pytest.raises(ValueError, match="`select_stages`"):
        with decode_launch(select_stages=True):
            pass
    with pytest.raises(RuntimeError):
        with decode_launch(select_programs_per_sm=16, attend_shares=0) as launch:
            assert (launch.select_programs_per_sm, launch.attend_shares) == (16, 0)
            raise RuntimeError
    assert dataclasses.asdict(DECODE_LAUNCH) == before


def test_select_splits_drop_once_slots_times_heads_cover_the_sms(monkeypatch):
    """decode_splits on a 132-SM GPU (H100 SXM): about 8 programs per SM while slots x KV heads leave
    SMs idle, 2 once they cover them (the H100 tuning's B=32 point), rounded down to a power of two,
    never more than the summary tiles or MAX_SPLITS; 1 where there is no GPU."""
    from nsa_baseline.ops import decode_select as sel

    monkeypatch.setattr(sel, "gpu_programs", lambda device, per_sm: 132 * per_sm)
    cuda = torch.device("cuda", 0)
    assert sel.decode_splits(8, 8, 4096, cuda) == 16  # 1056 programs over 64 (slot, head) pairs: 17 -> 16
    assert sel.decode_splits(16, 8, 4096, cuda) == 8  # 128 pairs < 132 SMs: still ~8 per SM (9 -> 8)
    assert sel.decode_splits(3, 8, 4096, cuda) == 32  # 44 -> 32
    assert sel.decode_splits(32, 8, 4096, cuda) == 2  # 256 pairs >= 132: 264 programs
    assert sel.decode_splits(1, 8, 4096, cuda) == 32  # capped by 4096 / 128 summary tiles
    assert sel.decode_splits(1, 1, 65536, cuda) == sel.MAX_SPLITS
    with decode_launch(select_programs_per_sm_full=8):
        assert sel.decode_splits(32, 8, 4096, cuda) == 4  # 5 -> 4
    monkeypatch.setattr(sel, "gpu_programs", lambda device, per_sm: 0)  # CPU / interpreter
    assert sel.decode_splits(8, 8, 4096, torch.device("cpu")) == 1


def test_attend_splits_stop_once_slots_times_heads_cover_the_sms(monkeypatch):
    """attend_splits on a 132-SM GPU: about 2 programs per SM split over the items (16 selected
    blocks + 8 window tiles here) while slots x KV heads leave SMs idle, one program per (slot, KV
    head) from 132 pairs on."""
    from nsa_baseline.ops import decode_attend as att

    monkeypatch.setattr(att, "gpu_programs", lambda device, per_sm: 132 * per_sm)
    cuda = torch.device("cuda", 0)
    assert att.attend_splits(8, 8, 16, 512, cuda) == 5  # 264 programs over 64 pairs
    assert att.attend_splits(16, 8, 16, 512, cuda) == 3  # 128 pairs < 132
    assert att.attend_splits(32, 8, 16, 512, cuda) == 1  # 256 pairs >= 132
    assert att.attend_splits(1, 1, 16, 512, cuda) == 24  # at most one per item
    monkeypatch.setattr(att, "gpu_programs", lambda device, per_sm: 0)
    assert att.attend_splits(1, 8, 16, 512, torch.device("cpu")) == 1


def test_kernels_name_bad_arguments():
    q, kc = torch.randn(2, 4, 16), torch.randn(2, 5, 2, 16)
    pos = torch.tensor([3, 9], dtype=torch.int32)
    with pytest.raises(ValueError, match="`pos`"):
        decode_compressed_select(q, kc, kc, pos.long(), 8, 4, 16, 3, 1, 1, 0.25)
    with pytest.raises(ValueError, match="`k_cmp`"):
        decode_compressed_select(q, kc.double(), kc, pos, 8, 4, 16, 3, 1, 1, 0.25)
    with pytest.raises(ValueError, match="`block_size`"):
        decode_compressed_select(q, kc, kc, pos, 8, 4, 24, 3, 1, 1, 0.25)
    with pytest.raises(ValueError, match="`splits`"):
        decode_compressed_select(q, kc, kc, pos, 8, 4, 16, 3, 1, 1, 0.25, splits=0)
    k = torch.randn(2, 32, 2, 16)
    o_cmp, gates, idx = torch.zeros(2, 4, 16), torch.rand(2, 4, 3), torch.zeros(2, 2, 3, dtype=torch.int32)
    with pytest.raises(ValueError, match="`block_indices`"):
        decode_selected_window(q, k, k, pos, idx.long(), o_cmp, gates, 16, 12, 0.25)
    with pytest.raises(ValueError, match="`o_cmp`"):
        decode_selected_window(q, k, k, pos, idx, o_cmp.half(), gates, 16, 12, 0.25)
    with pytest.raises(ValueError, match="`window_size`"):
        decode_selected_window(q, k, k, pos, idx, o_cmp, gates, 16, 0, 0.25)
    kn, kc = torch.randn(2, 2, 16), torch.zeros(2, 7, 2, 16)
    before = k.clone()
    with pytest.raises(ValueError, match="`lengths`"):
        decode_append(kn, kn, k, k, kc, kc, pos.long(), 8, 4)
    with pytest.raises(ValueError, match="`k_new`"):
        decode_append(kn[:, :1], kn, k, k, kc, kc, pos, 8, 4)
    with pytest.raises(ValueError, match="`v_weight`"):
        decode_append(kn, kn, k, k, kc, kc, pos, 8, 4, k_weight=torch.zeros(128, 16), k_pos=torch.zeros(8, 16))
    with pytest.raises(ValueError, match="`column_tile`"):
        decode_append(kn, kn, k, k, kc, kc, pos, 8, 4, column_tile=8)
    with pytest.raises(ValueError, match="`splits`"):
        decode_selected_window(q, k, k, pos, idx, o_cmp, gates, 16, 12, 0.25, splits=0)
    with pytest.raises(ValueError, match="`advance`"):  # the kernels read pos while they move the lengths
        decode_selected_window(q, k, k, pos, idx, o_cmp, gates, 16, 12, 0.25, advance=pos)
    with pytest.raises(ValueError, match="`advance`"):
        decode_selected_window(q, k, k, pos, idx, o_cmp, gates, 16, 12, 0.25, advance=pos.long())
    assert torch.equal(k, before) and pos.tolist() == [3, 9]  # nothing written


def _append_reference(k_new, v_new, cache, lengths, ks, st, weights):
    """decode_append's effect on copies of cache = (k, v, k_cmp, v_cmp): row lengths[b] of every slot
    that has room, the summary it completes through compress_spans (the module's maths)."""
    k, v, k_cmp, v_cmp = (t.clone() for t in cache)
    for b, n in enumerate(lengths.tolist()):
        if n >= k.shape[1]:
            continue
        k[b, n], v[b, n] = k_new[b], v_new[b]
        start = n + 1 - ks
        if start >= 0 and start % st == 0 and start // st < k_cmp.shape[1]:
            for x, dst, w in ((k, k_cmp, weights[:2]), (v, v_cmp, weights[2:])):
                dst[b, start // st] = compress_spans(x[b, start:n + 1][None], *w)[0]
    return k, v, k_cmp, v_cmp


@pytest.mark.parametrize("tiles", [(None, None), (16, 4)])
@pytest.mark.parametrize("compression", ["linear", "mean"])
def test_append_columns_and_kernel_chunks_equal_reference(compression, tiles):
    """decode_append over (slot, column tile, k / v) programs: slots of lengths 0, 5, 8 and 16 (room for
    3 of the 4 steps: the last step of that slot writes nothing), kernel 6 / stride 2, so summaries
    are completed at different steps per slot. (16, 4): two column tiles of D = 32, kernel positions in
    chunks of 4 (the second one half masked); (None, None): the interpreter's one tile. Positions,
    rows, summaries and lengths (+1 per step) equal the reference after every step."""
    ks, st, h, d, max_seqlen = 6, 2, 3, 32, 18
    lengths = torch.tensor([0, 5, 8, 16], dtype=torch.int32)
    b = lengths.numel()
    max_cmp = (max_seqlen - ks) // st + 1
    cache = (torch.randn(b, max_seqlen, h, d), torch.randn(b, max_seqlen, h, d), torch.randn(b, max_cmp, h, d),
             torch.randn(b, max_cmp, h, d))
    weights = (None,) * 4
    if compression == "linear":
        weights = (torch.randn(ks * d, d) / d, torch.randn(ks, d), torch.randn(ks * d, d) / d, torch.randn(ks, d))
    w = dict(zip(("k_weight", "k_pos", "v_weight", "v_pos"), weights)) if compression == "linear" else {}
    for step in range(4):
        k_new, v_new = torch.randn(b, h, d), torch.randn(b, h, d)
        want = _append_reference(k_new, v_new, cache, lengths, ks, st, weights)
        before = lengths.clone()
        pos = decode_append(k_new, v_new, *cache, lengths, ks, st, column_tile=tiles[0], kernel_chunk=tiles[1], **w)
        assert torch.equal(pos, before) and torch.equal(lengths, before + 1), (step, pos, lengths)
        for name, got, ref in zip(("k", "v", "k_cmp", "v_cmp"), cache, want):
            assert_close(got, ref, torch.float32, f"step {step}: {name}")


def test_append_without_advance_leaves_lengths_to_the_attend_kernel():
    """advance=False: decode_append writes the rows and positions but not the lengths; the attend
    kernel with advance=lengths sets them to pos + 1 (what the decode step does)."""
    h, d = 2, 16
    k, kc = torch.zeros(2, 32, h, d), torch.zeros(2, 7, h, d)
    lengths = torch.tensor([3, 9], dtype=torch.int32)
    kn = torch.randn(2, h, d)
    pos = decode_append(kn, kn, k, k.clone(), kc, kc.clone(), lengths, 8, 4, advance=False)
    assert pos.tolist() == [3, 9] and lengths.tolist() == [3, 9] and torch.equal(k[1, 9], kn[1])
    q, o_cmp, gates = torch.randn(2, 4, d), torch.zeros(2, 4, d), torch.rand(2, 4, 3)
    idx = torch.tensor([[[0, -1, -1]] * h] * 2, dtype=torch.int32)
    decode_selected_window(q, k, k, pos, idx, o_cmp, gates, 16, 12, 0.25, advance=lengths)
    assert lengths.tolist() == [4, 10]


# ---- GPU: bf16 at realistic sizes, CUDA-graph replay ----

def _llama_like(backend, compression="linear"):
    """32 query / 8 KV heads, d = 128, the (64, 16) preset, window 512, bf16 on CUDA."""
    torch.manual_seed(0)
    m = NativeSparseAttention(1024, 32, 8, 128, kernel_size=32, kernel_stride=16, block_size=64, topk=16,
                              window_size=512, compression=compression, backend=backend)
    return m.to("cuda", torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["nsa", "fsa"])
def test_gpu_decode_bf16_equals_pytorch_path_and_full_forward(backend):
    """Slots prefilled to 0, 1000, 4133 and 8191 tokens, 40 decode steps, bf16."""
    decode_and_compare(_llama_like(backend), [0, 1000, 4133, 8191], 40, max_seqlen=8192 + 40)


@pytest.mark.gpu
@pytest.mark.parametrize("g", [1, 3, 5, 16])
def test_gpu_decode_any_g(g):
    decode_and_compare(small_module(g, h=4, d=64, device="cuda", dtype=torch.bfloat16, block_size=64,
                                    kernel_size=32, kernel_stride=16, topk=8, window_size=100),
                       [0, 300, 1500], 24, max_seqlen=1600)


@pytest.mark.gpu
def test_gpu_graph_replay_equals_eager():
    from nsa_baseline.inference.graph import DecodeGraph

    m = _llama_like("fsa")
    lens = [3000, 17, 1025, 0]
    eager, graphed = m.new_cache(4, 4096), m.new_cache(4, 4096)
    x = torch.randn(sum(lens), 1024, device="cuda", dtype=torch.bfloat16)
    for cache in (eager, graphed):
        m(x, packed(lens).cuda(), cache=cache)
    graph = DecodeGraph(m, graphed)
    assert graphed.host_lengths == tuple(lens) and graphed.lengths.tolist() == lens  # capture left no trace
    for step in range(20):
        xs = torch.randn(4, 1024, device="cuda", dtype=torch.bfloat16)
        y_eager, y_graph = decode_step(m, xs, eager), graph.step(xs)
        assert_close(y_graph, y_eager, torch.bfloat16, f"step {step}", tol=1e-3)  # same kernels: bitwise in practice
    for name, t in eager.tensors().items():
        assert_close(graphed.tensors()[name].double(), t.double(), torch.bfloat16, name, tol=1e-3)
    assert graphed.host_lengths == tuple(n + 20 for n in lens)


@pytest.mark.gpu
def test_gpu_paged_cache_replay_equals_contiguous_eager():
    """bf16, Llama-like heads: a paged cache (pages of 128 rows, a pool of 96 against 128 for every
    slot at max_seqlen) replayed from a CUDA graph decodes like the contiguous cache eagerly; slot 1
    crosses into a new page mid-way (its block table entry copied before that replay)."""
    from nsa_baseline.inference.graph import DecodeGraph

    m = _llama_like("fsa")
    lens = [3000, 120, 1025, 0]
    flat, paged = m.new_cache(4, 4096), m.new_cache(4, 4096, page_size=128, num_pages=96)
    x = torch.randn(sum(lens), 1024, device="cuda", dtype=torch.bfloat16)
    for cache in (flat, paged):
        m(x, packed(lens).cuda(), cache=cache)
    graph = DecodeGraph(m, paged)
    for step in range(24):
        xs = torch.randn(4, 1024, device="cuda", dtype=torch.bfloat16)
        assert_close(graph.step(xs), decode_step(m, xs, flat), torch.bfloat16, f"step {step}", tol=1e-3)
    assert paged.block_table[1, 1].item() >= 0 and paged.host_lengths == flat.host_lengths


@pytest.mark.gpu
@pytest.mark.parametrize("splits", [None, 7])
def test_gpu_select_split_equals_one_program(splits):
    """bf16, Llama-like heads over an 8K cache: the split path (the SM rule's S, or 7) gives the S = 1
    o_cmp and blocks whose reference scores are the top ones (positions 0 .. 8191, uneven splits)."""
    ks, st, bs, topk, init, local, h, g, d = 32, 16, 64, 16, 1, 2, 8, 4, 128
    torch.manual_seed(0)
    pos = torch.tensor([0, 700, 4133, 8191], dtype=torch.int32, device="cuda")
    max_cmp = (8192 - ks) // st + 1
    q = torch.randn(4, g * h, d, device="cuda", dtype=torch.bfloat16)
    k_cmp, v_cmp = (torch.randn(4, max_cmp, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    args = (q, k_cmp, v_cmp, pos, ks, st, bs, topk, init, local, d ** -0.5)
    o1, idx1 = decode_compressed_select(*args, splits=1)
    o_s, idx_s = decode_compressed_select(*args, splits=splits)
    # both rounded to bf16 after fp32 sums in another order: about one bf16 ulp apart (1.4e-3 seen)
    assert_close(o_s, o1, torch.bfloat16, "o_cmp split vs 1", tol=4e-3)
    _, key = _reference_selection(*(a.cpu().float() if isinstance(a, torch.Tensor) and a.is_floating_point()
                                    else a.cpu() if isinstance(a, torch.Tensor) else a for a in args))
    _assert_selection(idx_s.cpu(), key, pos.cpu(), bs, topk, rtol=1e-4)
    assert (idx_s == idx1).float().mean() > 0.95  # same sets up to near-ties of bf16 rounding


@pytest.mark.gpu
@pytest.mark.parametrize("splits", [None, 5])
def test_gpu_attend_split_equals_one_program(splits):
    """bf16, Llama-like heads over an 8K cache, T = 16 blocks + window 512 (24 items): the split attend
    (the SM rule's S, or 5) gives the S = 1 output and the float64 reference's."""
    bs, window, topk, h, g, d = 64, 512, 16, 8, 4, 128
    torch.manual_seed(0)
    pos = torch.tensor([0, 700, 4133, 8191], dtype=torch.int32, device="cuda")
    b = pos.numel()
    q = torch.randn(b, g * h, d, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(b, 8192, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    o_cmp = torch.randn(b, g * h, d, device="cuda")
    gates = torch.rand(b, g * h, 3, device="cuda", dtype=torch.bfloat16)
    idx = torch.full((b, h, topk), -1, dtype=torch.int32)
    for s, t in enumerate(pos.tolist()):
        for hh in range(h):
            n = min(topk, t // bs + 1)
            idx[s, hh, :n] = torch.randperm(t // bs + 1)[:n].int()
    args = (q, k, v, pos, idx.cuda(), o_cmp, gates, bs, window, d ** -0.5)
    o1 = decode_selected_window(*args, splits=1)
    o_s = decode_selected_window(*args, splits=splits)
    assert_close(o_s, o1, torch.bfloat16, "split vs 1", tol=4e-3)
    ref = _reference_selected_window(*(a.cpu() if isinstance(a, torch.Tensor) else a for a in args))
    assert_close(o_s, ref.to(o_s.device), torch.bfloat16, "split vs reference")


@pytest.mark.gpu
@pytest.mark.parametrize("compression", ["linear", "mean"])
@pytest.mark.parametrize("column_tile", [None, 64])
def test_gpu_append_equals_reference(compression, column_tile):
    """bf16, 8 KV heads, d = 128, kernel 32 / stride 16: 20 steps from lengths 0, 15, 31, 4095 (each
    slot completes summaries at different steps), the SM rule's column tiles or 64; rows, summaries,
    positions and lengths equal the reference."""
    ks, st, h, d, max_seqlen = 32, 16, 8, 128, 4200
    lengths = torch.tensor([0, 15, 31, 4095], dtype=torch.int32, device="cuda")
    b = lengths.numel()
    max_cmp = (max_seqlen - ks) // st + 1
    cache = tuple(torch.randn(b, n, h, d, device="cuda", dtype=torch.bfloat16)
                  for n in (max_seqlen, max_seqlen, max_cmp, max_cmp))
    weights = (None,) * 4
    if compression == "linear":
        weights = tuple((torch.randn(*shape, device="cuda") * s).to(torch.bfloat16)
                        for shape, s in (((ks * d, d), d ** -0.5 / ks ** 0.5), ((ks, d), 1.0)) * 2)
    w = dict(zip(("k_weight", "k_pos", "v_weight", "v_pos"), weights)) if compression == "linear" else {}
    for step in range(20):
        k_new, v_new = (torch.randn(b, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        want = _append_reference(k_new, v_new, cache, lengths, ks, st, weights)
        before = lengths.clone()
        pos = decode_append(k_new, v_new, *cache, lengths, ks, st, column_tile=column_tile, **w)
        assert torch.equal(pos, before) and torch.equal(lengths, before + 1), (step, pos, lengths)
        for name, got, ref in zip(("k", "v", "k_cmp", "v_cmp"), cache, want):
            assert_close(got, ref, torch.bfloat16, f"step {step}: {name}")


@pytest.mark.gpu
def test_gpu_window_stream_replay_equals_eager_without_it():
    """The early window branch on its side stream, eager and replayed from a CUDA graph (fork and join
    captured), against the step without it."""
    from nsa_baseline.inference.graph import DecodeGraph

    m = _llama_like("fsa")
    lens = [3000, 17, 1025, 0]
    plain, early, graphed = (m.new_cache(4, 4096) for _ in range(3))
    x = torch.randn(sum(lens), 1024, device="cuda", dtype=torch.bfloat16)
    for cache in (plain, early, graphed):
        m(x, packed(lens).cuda(), cache=cache)
    with decode_launch(window_stream=1):
        graph = DecodeGraph(m, graphed)
    for step in range(20):
        xs = torch.randn(4, 1024, device="cuda", dtype=torch.bfloat16)
        y_plain = decode_step(m, xs, plain)
        with decode_launch(window_stream=1):
            y_early = decode_step(m, xs, early)
        y_graph = graph.step(xs)
        assert_close(y_early, y_plain, torch.bfloat16, f"step {step} early", tol=1e-3)
        assert_close(y_graph, y_early, torch.bfloat16, f"step {step} graph", tol=1e-3)
