"""The cache object and bad calls: layout and nbytes, reset(slot) for serving, calls with no new
token, and every bad call raising a ValueError that names the argument while the cache stays exactly
as it was (every tensor and the host lengths), after which the next valid call is still correct."""
import copy

import pytest
import torch

from nsa_baseline.inference import NSACache
from nsa_baseline.module import NativeSparseAttention
from tests.helpers import assert_close
from tests.inference.schedules import packed, run_schedule
from tests.inference.test_cache import tiny


def snapshot(cache: NSACache):
    return {name: t.clone() for name, t in cache.tensors().items()}, cache.host_lengths


def assert_unchanged(cache: NSACache, snap):
    tensors, host = snap
    assert cache.host_lengths == host
    for name, t in cache.tensors().items():
        assert torch.equal(t, tensors[name]), name


def test_layout_and_nbytes():
    m = tiny(3, h=2, d=4)  # kernel_size 4, stride 2
    cache = m.new_cache(3, 21)
    assert cache.k.shape == cache.v.shape == (3, 21, 2, 4) and cache.k.is_contiguous()
    assert cache.max_cmp == (21 - 4) // 2 + 1 and cache.k_cmp.shape == cache.v_cmp.shape == (3, 9, 2, 4)
    assert cache.lengths.dtype == torch.int32 and cache.lengths.tolist() == [0, 0, 0]
    assert cache.dtype == torch.float64 and cache.device == m.q_proj.weight.device
    assert cache.nbytes == 8 * (2 * 3 * 21 * 2 * 4 + 2 * 3 * 9 * 2 * 4) + 4 * 3
    assert cache.nbytes == sum(t.numel() * t.element_size() for t in cache.tensors().values())
    assert m.new_cache(1, 3).k_cmp.shape == (1, 0, 2, 4)  # shorter than a summary: no summary slot
    assert m.new_cache(2, 8, dtype=torch.float32).nbytes == 4 * (2 * 2 * 8 * 2 * 4 + 2 * 2 * 3 * 2 * 4) + 4 * 2


@pytest.mark.parametrize("kwargs, arg", [(dict(batch_size=0, max_seqlen=4), "batch_size"),
                                         (dict(batch_size=2, max_seqlen=0), "max_seqlen"),
                                         (dict(batch_size=2, max_seqlen=4, dtype=torch.int32), "dtype")])
def test_new_cache_checks_its_arguments(kwargs, arg):
    with pytest.raises(ValueError, match=f"`{arg}`"):
        tiny(1).new_cache(**kwargs)


def test_reset_slot_starts_a_new_sequence():
    """Slot 1 is reset mid-way and takes a new sequence; slots 0 and 2 continue unaffected."""
    m = tiny(3)
    first = [torch.randn(n, 12, dtype=torch.float64) for n in (9, 17, 6)]
    cache = run_schedule(m, first, [[5, 10, 3], [1, 1, 1], [3, 6, 2]], max_seqlen=32)
    cache.reset(1)
    assert cache.host_lengths == (9, 0, 6) and cache.lengths.tolist() == [9, 0, 6]
    assert not cache.k[1].any() and not cache.k_cmp[1].any()
    new = torch.randn(14, 12, dtype=torch.float64)
    more = [torch.randn(4, 12, dtype=torch.float64), torch.randn(3, 12, dtype=torch.float64)]
    with torch.no_grad():
        want = m(torch.cat([first[0], more[0], new, first[2], more[1]]), packed([13, 14, 9]))
    y1 = m(torch.cat([more[0][:3], new[:11], more[1][:1]]), packed([3, 11, 1]), cache=cache)
    y2 = m(torch.cat([more[0][3:], new[11:], more[1][1:]]), packed([1, 3, 2]), cache=cache)
    rows = lambda spans: torch.cat([want[a:b] for a, b in spans])
    assert_close(y1, rows([(9, 12), (13, 24), (33, 34)]), torch.float64, "after reset")
    assert_close(y2, rows([(12, 13), (24, 27), (34, 36)]), torch.float64, "after reset, next call")
    with pytest.raises(ValueError, match="`slot`"):
        cache.reset(3)


def test_no_new_tokens_anywhere():
    m = tiny(2)
    cache = run_schedule(m, [torch.randn(n, 12, dtype=torch.float64) for n in (5, 9)], [[5, 9]], max_seqlen=16)
    snap = snapshot(cache)
    y = m(torch.zeros(0, 12, dtype=torch.float64), packed([0, 0]), cache=cache)
    assert y.shape == (0, 12)
    assert_unchanged(cache, snap)


def _bad_calls(m, cache):
    """(name, call, argument the error names) for every bad call on a 2-slot cache of max_seqlen 16
    holding 5 and 9 tokens; each call brings 1 + 1 tokens unless it is about counts."""
    x = torch.randn(2, 12, dtype=torch.float64)
    cu = packed([1, 1])
    other = {"kernel_size": NativeSparseAttention(12, 6, 2, 4, kernel_size=8, kernel_stride=2, block_size=8),
             "num_kv_heads": NativeSparseAttention(12, 6, 3, 4, kernel_size=4, kernel_stride=2, block_size=8),
             "head_dim": NativeSparseAttention(12, 6, 2, 6, kernel_size=4, kernel_stride=2, block_size=8),
             "rope_theta": NativeSparseAttention(12, 6, 2, 4, kernel_size=4, kernel_stride=2, block_size=8,
                                                 rope_theta=500.0)}
    calls = [
        ("past max_seqlen", lambda: m(torch.randn(9, 12, dtype=torch.float64), packed([1, 8]), cache=cache),
         "cu_seqlens"),
        ("cu_seqlens None with 2 slots", lambda: m(x, None, cache=cache), "cu_seqlens"),
        ("cu_seqlens of 1 slot", lambda: m(x, packed([2]), cache=cache), "cu_seqlens"),
        ("cu_seqlens of 3 slots", lambda: m(x, packed([1, 1, 0]), cache=cache), "cu_seqlens"),
        ("cu_seqlens int64", lambda: m(x, cu.long(), cache=cache), "cu_seqlens"),
        ("cu_seqlens on another device", lambda: m(x, cu.to("meta"), cache=cache), "cu_seqlens"),
        ("negative count", lambda: m(x, torch.tensor([0, 3, 2], dtype=torch.int32), cache=cache), "cu_seqlens"),
        ("cu_seqlens not ending at N", lambda: m(x, packed([1, 2]), cache=cache), "cu_seqlens"),
        ("cu_seqlens not starting at 0", lambda: m(x, torch.tensor([1, 1, 2], dtype=torch.int32), cache=cache),
         "cu_seqlens"),
        ("x float32", lambda: m(x.float(), cu, cache=cache), "x"),
        ("x of another width", lambda: m(torch.randn(2, 11, dtype=torch.float64), cu, cache=cache), "x"),
        ("x 3-D", lambda: m(x[None], cu, cache=cache), "x"),
        ("x on another device", lambda: m(x.to("meta"), cu, cache=cache), "x"),
        ("not a cache", lambda: m(x, cu, cache=cache.tensors()), "cache"),
        ("cache of another dtype", lambda: copy.deepcopy(m).float()(x.float(), cu, cache=cache), "cache"),
        ("return_branches", lambda: m(x, cu, True, cache=cache), "return_branches"),
    ] + [(f"module of another {field}", lambda mod=mod: mod.double()(x, cu, cache=cache), "cache")
         for field, mod in other.items()]
    return calls


def test_bad_calls_leave_the_cache_unchanged_and_the_next_call_is_correct():
    m = tiny(3)
    seqs = [torch.randn(n, 12, dtype=torch.float64) for n in (7, 11)]
    cache = run_schedule(m, seqs, [[5, 9]], max_seqlen=16)
    snap = snapshot(cache)
    for name, call, arg in _bad_calls(m, cache):
        with pytest.raises(ValueError, match=f"`{arg}`"):
            call()
        assert_unchanged(cache, snap)
    with torch.no_grad():
        full = m(torch.cat(seqs), packed([7, 11]))
    y = m(torch.cat([seqs[0][5:7], seqs[1][9:11]]), packed([2, 2]), cache=cache)
    assert_close(y, torch.cat([full[5:7], full[16:18]]), torch.float64, "next valid call")


def test_cache_of_another_device_is_refused():
    m = tiny(1)
    cache = NSACache(m.new_cache(1, 8).config, 1, 8, "meta", torch.float64)
    with pytest.raises(ValueError, match="`cache`.*meta"):
        m(torch.randn(2, 12, dtype=torch.float64), cache=cache)
