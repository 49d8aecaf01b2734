"""Decode and chunked prefill with a cache equal the module's forward over the whole sequences, at
every call, for every backend: varlen slots, slots with no new tokens, histories crossing the
kernel_size / kernel_stride / block_size boundaries, windows shorter and longer than the history."""
import pytest
import torch

from nsa_baseline.backends import resolve_backend
from nsa_baseline.module import NativeSparseAttention
from tests.inference.schedules import run_schedule

# kernel_size 4, stride 2, BS 8: a new summary every 2 tokens from token 4, a new block every 8.
SMALL = dict(kernel_size=4, kernel_stride=2, block_size=8, topk=3, init_blocks=1, local_blocks=1)


def tiny(g: int, h: int = 2, d: int = 4, compression="linear", window_size=6, **kw):
    torch.manual_seed(0)
    m = NativeSparseAttention(12, g * h, h, d, compression=compression, window_size=window_size, **{**SMALL, **kw})
    m = m.double()
    if compression == "linear":  # move away from the mean-pooling init so the weights matter
        with torch.no_grad():
            for p in (m.k_cmp_weight, m.v_cmp_weight, m.k_cmp_pos, m.v_cmp_pos):
                p.add_(0.1 * torch.randn_like(p))
    return m


def decode_steps(counts_first: list[int], steps: int) -> list[list[int]]:
    return [counts_first] + [[1] * len(counts_first)] * steps


@pytest.mark.parametrize("compression", ["linear", "mean"])
@pytest.mark.parametrize("g", [1, 3, 5, 16])
def test_prefill_then_decode_equals_full_forward(g, compression):
    """Three slots prefilled to 0, 3 and 9 tokens, then 24 decode steps: every summary and block
    boundary is crossed one token at a time (window 6 is shorter than the history)."""
    m = tiny(g, compression=compression)
    seqs = [torch.randn(n, 12, dtype=torch.float64) for n in (24, 27, 33)]
    run_schedule(m, seqs, decode_steps([0, 3, 9], 24), max_seqlen=40)


@pytest.mark.parametrize("window_size", [3, 64])
def test_chunked_prefill_any_counts(window_size):
    """Chunks of every size (0 too) across slots of different lengths; windows shorter and longer
    than the history."""
    m = tiny(3, window_size=window_size)
    schedule = [[5, 0, 1], [0, 7, 1], [11, 9, 0], [1, 1, 17], [3, 0, 2], [0, 0, 0], [13, 16, 1]]
    lens = [sum(c[b] for c in schedule) for b in range(3)]
    seqs = [torch.randn(n, 12, dtype=torch.float64) for n in lens]
    run_schedule(m, seqs, schedule, max_seqlen=max(lens))


def test_one_slot_with_and_without_cu_seqlens():
    """One slot: cu_seqlens None and int32 [2] alternate (run_schedule), up to exactly max_seqlen."""
    m = tiny(2, h=1, topk=4, init_blocks=2, local_blocks=2)
    seqs = [torch.randn(37, 12, dtype=torch.float64)]
    run_schedule(m, seqs, [[4], [1], [1], [8], [1], [16], [1], [5]], max_seqlen=37)


def test_forced_blocks_fill_topk_and_odd_strides():
    """kernel_size == stride (disjoint summaries), topk == init + local (no free slot), BS 12."""
    m = tiny(1, h=3, kernel_size=6, kernel_stride=6, block_size=12, topk=2, init_blocks=1, local_blocks=1)
    seqs = [torch.randn(n, 12, dtype=torch.float64) for n in (30, 41)]
    run_schedule(m, seqs, [[13, 2], [1, 1], [1, 13], [15, 1], [0, 24]], max_seqlen=41)


def test_cache_shorter_than_a_summary():
    """max_seqlen 3 < kernel_size 4: the cache holds no summary slot; the compressed branch sees nothing."""
    m = tiny(2)
    seqs = [torch.randn(n, 12, dtype=torch.float64) for n in (3, 2)]
    run_schedule(m, seqs, [[1, 0], [1, 1], [1, 1]], max_seqlen=3)


@pytest.mark.parametrize("backend", ["nsa", "fsa", "auto"])
def test_kernel_backends_equal_their_full_forward(backend):
    """Kernel backends (fp32, the interpreter on CPU): the prefill runs the module's kernels, later
    calls the cached path; both equal the kernels' forward over the whole sequences."""
    try:
        resolve_backend(backend)
    except ImportError as err:
        pytest.skip(str(err))
    torch.manual_seed(0)
    kw = dict(kernel_size=16, kernel_stride=8, block_size=16, topk=3, window_size=20)
    m = NativeSparseAttention(32, 3, 1, 16, backend=backend, **kw)  # g = 3
    schedule = [[17, 10], [1, 1], [0, 14], [1, 1], [15, 0], [0, 9], [1, 1]]
    seqs = [torch.randn(sum(c[b] for c in schedule), 32) for b in range(2)]  # 35 and 36 tokens
    run_schedule(m, seqs, schedule, max_seqlen=64)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["nsa", "fsa", "auto"])
def test_gpu_prefill_chunked_decode(backend):
    """On the GPU (fp32, so that block choices have no near-ties): the paper's sizes, g = 4, two
    slots, prefill 1000 / 1777 tokens, 8 decode steps, a 300-token chunk, 4 decode steps."""
    torch.manual_seed(0)
    m = NativeSparseAttention(512, 16, 4, 64, backend=backend).cuda()
    lens = [1000 + 8 + 300 + 4, 1777 + 8 + 300 + 4]
    seqs = [torch.randn(n, 512, device="cuda") for n in lens]
    schedule = [[1000, 1777]] + [[1, 1]] * 8 + [[300, 300]] + [[1, 1]] * 4
    with torch.device("cuda"):
        run_schedule(m, seqs, schedule, max_seqlen=4096, tol=5e-3)


@pytest.mark.parametrize("kind", ["peaked", "repeated"])
def test_adversarial_inputs(kind):
    """Large activations (near one-hot softmaxes, logits ~1e2) and one token repeated (keys differ only
    by RoPE, block scores close together)."""
    m = tiny(3)
    if kind == "peaked":
        seqs = [30 * torch.randn(n, 12, dtype=torch.float64) for n in (26, 19)]
    else:
        seqs = [torch.randn(1, 12, dtype=torch.float64).expand(n, 12).contiguous() for n in (26, 19)]
    run_schedule(m, seqs, [[9, 0]] + [[1, 1]] * 7 + [[10, 12]], max_seqlen=26)
