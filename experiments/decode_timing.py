"""GPU timing of one decode step, shared by `experiments.gpu.decode_bench` (the one-call script) and
the sweep's scope=decode (experiments/decode_jobs.py): do_bench medians, CUDA-graph capture of a
step, a cache filled with random keys (timing only; tests/inference checks the maths), our step that
gives its length back (so the cache stays put while timed), dense SDPA decode over every fused
backend, and FlashInfer's batch decode over the same keys where the package is installed.
Importable without CUDA; every function here needs it when called (time_flashinfer only returns why
when flashinfer cannot be imported)."""
from __future__ import annotations

from typing import Callable, Optional

import torch

SDPA_BACKENDS = ("default", "cudnn", "flash", "efficient")


def bench(fn: Callable[[], object], warmup_ms: int = 10, rep_ms: int = 50) -> tuple[float, float, float]:
    """triton.testing.do_bench quantiles (p20, median, p80) in ms."""
    import triton

    return tuple(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.2, 0.5, 0.8]))


def graphed(fn: Callable[[], object]) -> Callable[[], None]:
    """fn captured in a CUDA graph (after two eager warm-up calls on a side stream) -> its replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay


def fill_cache(module, b: int, length: int, page_size: Optional[int] = None):
    """A cache of b slots holding length - 1 random tokens each (the new token attends `length` keys).
    page_size: a paged cache whose slots claimed their pages in turns (interleaved in the pool, as
    slots growing together would)."""
    cache = module.new_cache(b, length, page_size=page_size)
    if page_size is not None:
        for n in range(page_size, length + page_size, page_size):
            cache.claim_pages([min(n, length)] * b)
    for t in (cache.k, cache.v, cache.k_cmp, cache.v_cmp):
        t.normal_()
    cache.set_lengths([length - 1] * b)
    return cache


STEPS_PER_GRAPH = 16  # consecutive decode steps in one graph (the graph16 pass)


def attention_step(module, cache, seed: int = 0):
    """(step, out): step() runs NSA's decode attention between the projections (append, compressed
    select, selected + window + gated sum) for one new token per slot and gives the length back;
    out is one eager step's output (to check it is finite)."""
    return consecutive_steps(module, cache, 1, seed)


def repeated(fn: Callable[[], object], n: int) -> Callable[[], None]:
    """fn called n times in a row."""
    def run():
        for _ in range(n):
            fn()

    return run


def consecutive_steps(module, cache, n: int = STEPS_PER_GRAPH, seed: int = 0):
    """(steps, out): steps() runs n decode-attention steps in a row (each appends a token, so the cache
    grows from length - n through length - 1 as in real decoding), then gives the n lengths back with
    one add; out is the first step's output. The caller times steps / n (a CUDA graph of steps)."""
    from nsa_baseline.inference.decode import decode_attention

    b, hq, h, d = cache.batch_size, module.num_q_heads, module.num_kv_heads, module.head_dim
    gen = torch.Generator(device=cache.device).manual_seed(seed)
    q, k, v = (torch.randn(b, m, d, device=cache.device, dtype=cache.dtype, generator=gen) for m in (hq, h, h))
    gates = torch.rand(b, hq, 3, device=cache.device, dtype=cache.dtype, generator=gen)
    cache.lengths.sub_(n - 1)  # fill_cache left length - 1 tokens: start n - 1 earlier

    def steps():
        for _ in range(n):
            decode_attention(module, q, k, v, gates, cache)
        cache.lengths.sub_(n)

    out = decode_attention(module, q, k, v, gates, cache)
    cache.lengths.sub_(1)
    return steps, out


def time_consecutive(module, cache, warmup_ms: int = 10, rep_ms: int = 50, seed: int = 0,
                     n: int = STEPS_PER_GRAPH) -> tuple[float, float, float]:
    """The graph16 timing: (p20, median, p80) ms per step of n consecutive steps replayed from one CUDA
    graph (consecutive_steps); the cache's lengths end where they started."""
    steps, _ = consecutive_steps(module, cache, n, seed)
    t = bench(graphed(steps), warmup_ms, rep_ms)
    cache.lengths.add_(n - 1)  # consecutive_steps started n - 1 earlier
    return tuple(x / n for x in t)


def sdpa_choice(q, k, v) -> str:
    """The fused backend torch would pick for these inputs ('' when torch does not say)."""
    try:
        from torch.nn.attention import SDPBackend

        return SDPBackend(torch._fused_sdp_choice(q, k, v, enable_gqa=True)).name
    except Exception:  # a private API: report nothing rather than fail the run
        return ""


def sdpa_decode(qd, kd, vd, backend: str) -> Callable[[], torch.Tensor]:
    """Dense decode: q [B, HQ, 1, D] over k, v [B, H, L, D] (enable_gqa), `backend` forced unless
    'default' (torch's pick)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    forced = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
              "efficient": SDPBackend.EFFICIENT_ATTENTION}.get(backend)

    def run():
        if forced is None:
            return torch.nn.functional.scaled_dot_product_attention(qd, kd, vd, enable_gqa=True)
        with sdpa_kernel(forced):
            return torch.nn.functional.scaled_dot_product_attention(qd, kd, vd, enable_gqa=True)

    return run


def _time_modes(name: str, fn: Callable[[], object], modes, warmup_ms: int, rep_ms: int) -> list[tuple]:
    """(name, mode, (p20, median, p80) or None, error) of fn in every mode (graph16: one graph of
    STEPS_PER_GRAPH calls, time per call); after the first failure (inputs refused) no other mode."""
    out = []
    for mode in modes:
        try:
            if mode == "graph16":
                t = bench(graphed(repeated(fn, STEPS_PER_GRAPH)), warmup_ms, rep_ms)
                out.append((name, mode, tuple(x / STEPS_PER_GRAPH for x in t), ""))
                continue
            out.append((name, mode, bench(fn if mode == "eager" else graphed(fn), warmup_ms, rep_ms), ""))
        except Exception as err:  # a backend that does not take these inputs
            out.append((name, mode, None, f"{type(err).__name__}: {str(err)[:80]}"))
            break
    return out


def time_sdpa_backends(qd, kd, vd, modes=("eager", "graph"), warmup_ms: int = 10,
                       rep_ms: int = 50) -> list[tuple[str, str, Optional[tuple], str]]:
    """(backend, mode, (p20, median, p80) or None, error) for every SDPA backend and mode (graph16: one
    graph of STEPS_PER_GRAPH calls, time per call); a backend that refuses the inputs gets None and its
    error, once, and is not tried in the other modes."""
    out = []
    for name in SDPA_BACKENDS:
        out += _time_modes(name, sdpa_decode(qd, kd, vd, name), modes, warmup_ms, rep_ms)
    return out


FLASHINFER_VARIANTS = (("flashinfer", False), ("flashinfer_tc", True))  # (name, use_tensor_cores)
MATCH_TOL = 2e-2  # bf16 outputs of two decode kernels over the same keys: rounding only
FLASHINFER_PAGE = 16  # rows per page, vLLM's and FlashInfer's usual default


def to_hnd_pages(x: torch.Tensor, page_size: int) -> torch.Tensor:
    """[B, H, L, D] -> [B * L / page_size, H, page_size, D]: sequence b's pages are rows
    b * L / page_size onwards, in order (FlashInfer's HND paged layout)."""
    b, h, length, d = x.shape
    return x.reshape(b, h, length // page_size, page_size, d).transpose(1, 2).reshape(-1, h, page_size, d)


def time_flashinfer(qd, kd, vd, modes=("eager", "graph"), warmup_ms: int = 10,
                    rep_ms: int = 50, page_size: int = FLASHINFER_PAGE) -> list[tuple[str, str, Optional[tuple], str]]:
    """FlashInfer's batch decode (BatchDecodeWithPagedKVCacheWrapper, CUDA-core and tensor-core
    variants) over the same keys as dense SDPA: kd, vd [B, H, L, D] copied into its HND paged cache
    of `page_size`-row pages (a serving engine's layout; FlashInfer splits a long sequence across
    programs at page granularity, so one page per sequence would leave B=1 on a handful of SMs).
    Rows as time_sdpa_backends'; a variant whose output differs from SDPA's (relative error >
    MATCH_TOL) is not timed, and without the package (a JIT wheel: nvcc and apache-tvm-ffi on the GPU
    machine) one row says why."""
    try:
        import flashinfer
    except Exception as err:  # noqa: BLE001 - not installed, or its import needs what the machine lacks
        return [("flashinfer", modes[0], None, f"{type(err).__name__}: {str(err)[:80]}")]
    b, h, length, d = kd.shape
    if length % page_size:
        return [("flashinfer", modes[0], None, f"unsupported: length {length} not a multiple of page {page_size}")]
    hq = qd.shape[1]
    q = qd.reshape(b, hq, d)
    dev = q.device
    want = sdpa_decode(qd, kd, vd, "default")().reshape(b, hq, d).float()
    per_seq = length // page_size
    try:
        paged_k, paged_v = to_hnd_pages(kd, page_size), to_hnd_pages(vd, page_size)
    except torch.OutOfMemoryError as exc:
        return [("flashinfer", modes[0], None, f"OutOfMemoryError: paged copy of the cache ({str(exc)[:40]})")]
    indptr = torch.arange(b + 1, dtype=torch.int32, device=dev) * per_seq
    indices = torch.arange(b * per_seq, dtype=torch.int32, device=dev)
    last_len = torch.full((b,), page_size, dtype=torch.int32, device=dev)
    out = []
    for name, tensor_cores in FLASHINFER_VARIANTS:
        try:
            workspace = torch.empty(128 * 2**20, dtype=torch.uint8, device=dev)
            wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(workspace, "HND", use_tensor_cores=tensor_cores)
            wrapper.plan(indptr, indices, last_len, hq, h, d, page_size, pos_encoding_mode="NONE",
                         q_data_type=q.dtype, kv_data_type=kd.dtype)
            fn = (lambda w: lambda: w.run(q, (paged_k, paged_v)))(wrapper)
            err = float((fn().float() - want).norm() / want.norm().clamp_min(1e-30))
        except Exception as exc:  # noqa: BLE001 - JIT build or plan refused
            out.append((name, modes[0], None, f"{type(exc).__name__}: {str(exc)[:80]}"))
            continue
        if not err < MATCH_TOL:
            out.append((name, modes[0], None, f"mismatch: rel err {err:.2e} vs SDPA"))
            continue
        out += _time_modes(name, fn, modes, warmup_ms, rep_ms)
    return out
