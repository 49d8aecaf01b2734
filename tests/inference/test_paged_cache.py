"""The paged cache (new_cache(page_size=...)): keys and values in a pool of pages claimed as slots
grow, a block table per slot. Every call equals the module's full forward as with the contiguous
cache (the PyTorch path in float64; the decode kernels in fp32 under the interpreter, the split
attend kernel too), pages interleave between slots, a call the free pages cannot hold is refused
before any write (naming the argument), and reset(slot) gives its pages back. Chunked prefill
through the decode kernels (slots=: one query per kernel row at its own offset) on both layouts."""
import pytest
import torch

from nsa_baseline.inference.step import forward_with_cache
from tests.helpers import assert_close
from tests.inference.schedules import packed, run_schedule
from tests.inference.test_cache import tiny
from tests.inference.test_cache_calls import assert_unchanged, snapshot
from tests.inference.test_decode_kernels import decode_and_compare, force_attend_splits, small_module


def slot_rows(cache, slot: int, n: int):
    """(k, v) rows 0 .. n - 1 of `slot` read through the block table: [n, H, D] each."""
    at = cache.rows(torch.full((n,), slot), torch.arange(n))
    return cache.k[at], cache.v[at]


def test_paged_cache_calls_equal_the_full_forward_and_the_contiguous_cache():
    """PyTorch path (float64), block 8, pages of 16 rows, three slots growing at different speeds
    (their pages interleave in the pool), a pool smaller than every slot at max_seqlen."""
    m = tiny(3)
    seqs = [torch.randn(n, 12, dtype=torch.float64) for n in (40, 23, 33)]
    schedule = [[9, 17, 0], [1, 1, 1], [14, 0, 20], [1, 1, 1], [15, 4, 11]]
    paged = m.new_cache(3, 48, page_size=16, num_pages=8)
    assert paged.k.shape == (8, 16, 2, 4) and paged.block_table.shape == (3, 3)
    run_schedule(m, seqs, schedule, max_seqlen=48, cache=paged)
    flat = run_schedule(m, seqs, schedule, max_seqlen=48)
    assert paged.free_pages == 0 and sorted(p for row in paged.block_table.tolist() for p in row if p >= 0) == list(range(8))
    assert paged.block_table.tolist()[0] != [0, 1, 2]  # slot 0's pages are not consecutive
    for b, n in enumerate((40, 23, 33)):
        k, v = slot_rows(paged, b, n)
        assert torch.equal(k, flat.k[b, :n]) and torch.equal(v, flat.v[b, :n])
    assert torch.equal(paged.k_cmp, flat.k_cmp) and torch.equal(paged.v_cmp, flat.v_cmp)


def test_out_of_pages_is_refused_before_any_write_and_reset_gives_pages_back():
    m = tiny(3)
    cache = m.new_cache(2, 64, page_size=16, num_pages=3)
    forward_with_cache(m, torch.randn(20 + 10, 12, dtype=torch.float64), packed([20, 10]), cache)
    assert cache.free_pages == 0  # 2 pages for slot 0, 1 for slot 1
    snap = snapshot(cache)
    with pytest.raises(ValueError, match="`cu_seqlens`.*out of pages"):
        forward_with_cache(m, torch.randn(7, 12, dtype=torch.float64), packed([0, 7]), cache)
    assert_unchanged(cache, snap)
    forward_with_cache(m, torch.randn(6, 12, dtype=torch.float64), packed([0, 6]), cache)  # 16 rows: fits
    cache.reset(0)
    assert cache.free_pages == 2 and cache.block_table[0].tolist() == [-1] * 4
    seq = torch.randn(40, 12, dtype=torch.float64)
    y = forward_with_cache(m, seq[:17], packed([17, 0]), cache)  # slot 0 again, in the freed pages
    with torch.no_grad():
        assert torch.allclose(y, m(seq[:17]), atol=1e-12)
    with pytest.raises(ValueError, match="`page_size`.*multiple of the block size 8"):
        m.new_cache(2, 64, page_size=12)
    with pytest.raises(ValueError, match="`num_pages`"):
        m.new_cache(2, 64, num_pages=4)


def test_decode_kernels_read_and_write_through_the_block_table():
    """fp32 decode kernels under the interpreter on a paged cache (pages of one block, 16 rows): slots
    prefilled to 0, 37 and 90 tokens claim pages as they cross page boundaries one token at a time."""
    cache = decode_and_compare(small_module(3), [0, 37, 90], 12, max_seqlen=112, page_size=16, num_pages=14)
    assert cache.free_pages == 14 - (1 + 4 + 7)


@pytest.mark.parametrize("select_splits", [1, 3])
def test_split_attend_kernel_through_the_block_table(monkeypatch, select_splits):
    """The split attend kernel on a paged cache; with the compressed select split too (3), the decode
    step folds the select's merge into the attend kernels (DECODE_LAUNCH.fold_merge)."""
    import nsa_baseline.ops.decode_select as select

    force_attend_splits(monkeypatch, 3)
    monkeypatch.setattr(select, "decode_splits", lambda *a: select_splits)
    decode_and_compare(small_module(1, compression="mean", window_size=40), [5, 70], 8, max_seqlen=80,
                       page_size=32)


def test_decode_step_out_of_pages_names_x():
    from nsa_baseline.inference.decode import decode_step

    m = small_module(3)
    cache = m.new_cache(2, 64, page_size=16, num_pages=2)
    forward_with_cache(small_module(3, backend="torch"), torch.randn(16 + 3, 32), packed([16, 3]), cache)
    snap = snapshot(cache)
    with pytest.raises(ValueError, match="`x`.*out of pages"):  # slot 0 needs its second page
        decode_step(m, torch.randn(2, 32), cache)
    assert_unchanged(cache, snap)


@pytest.mark.parametrize("paged", [False, True])
def test_chunked_prefill_through_the_decode_kernels_equals_the_pytorch_path(monkeypatch, paged):
    """Calls of several new tokens against a history (chunks of 1 to 7 tokens, a slot with none) run the
    decode kernels with one query per kernel row mapped to its cache slot (slots=); they equal the
    PyTorch path, on a contiguous and a paged cache, with both kernels' splits forced (S = 3 / 2)."""
    import nsa_baseline.inference.step as step
    import nsa_baseline.ops.decode_select as select

    force_attend_splits(monkeypatch, 2)
    monkeypatch.setattr(select, "decode_splits", lambda *a: 3)
    kernel_rows = []  # the fast cache's calls must reach the kernels (not the PyTorch path twice)
    real = step.cached_kernel_attention
    monkeypatch.setattr(step, "cached_kernel_attention",
                        lambda module, q, *a: (kernel_rows.append(q.shape[0]), real(module, q, *a))[1])
    m = small_module(3)
    kw = dict(page_size=16) if paged else {}
    fast, slow = m.new_cache(2, 112, **kw), m.new_cache(2, 112, **kw)
    for counts in ([20, 7], [6, 0], [1, 7], [2, 3]):
        x = torch.randn(sum(counts), 32)
        y = forward_with_cache(m, x, packed(counts), fast)
        y_torch = forward_with_cache(m, x, packed(counts), slow, decode_kernels=False)
        assert_close(y, y_torch, torch.float32, f"counts {counts}: decode kernels vs PyTorch path")
    assert fast.host_lengths == slow.host_lengths == (29, 17)
    assert kernel_rows == [6, 8, 5]  # the first call is a prefill (no history): the module's forward


def test_benchmark_cache_interleaves_the_slots_pages():
    """experiments.decode_timing.fill_cache(page_size=): slots claim their pages in turns."""
    from experiments.decode_timing import fill_cache

    cache = fill_cache(small_module(1), 2, 64, page_size=16)
    assert cache.block_table.tolist() == [[0, 2, 4, 6], [1, 3, 5, 7]] and cache.host_lengths == (63, 63)
