"""Both selected-attention families against the reference on the shared adversarial cases:
o, lse, dq, dk, dv (Triton interpreter in fp32 / fp16 on CPU; outputs poisoned before launch)."""
import pytest
import torch

import fsa
import nsa_baseline
from tests.ops.cases import CASES, Case
from tests.ops.harness import check_all, check_empty_rows, reference, run_selected

FAMILIES = {"nsa": nsa_baseline.selected_attention, "fsa": fsa.selected_attention}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
family_param = pytest.mark.parametrize("family", FAMILIES.values(), ids=FAMILIES.keys())


# fp32 on every case; fp16 (the same kernels with 16-bit loads and dots) on the cases that cover its
# distinct paths (one sequence, holes, future blocks, padded D): the interpreter costs ~20 s per NSA case
# and the CPU suite stays under ~15 minutes.
FP16_CASES = {"single", "holes", "future", "d192"}
CASE_DTYPES = [pytest.param(c, DTYPES[name], id=f"{c.id}-{name}") for c in CASES for name in DTYPES
               if name == "fp32" or c.name in FP16_CASES]


@family_param
@pytest.mark.parametrize("case,dtype", CASE_DTYPES)
def test_matches_reference(family, case: Case, dtype, device):
    x = case.make(dtype, device)
    do = torch.randn_like(x.q)
    out = run_selected(family, x, do, check_indices=case.valid_indices)
    ref = reference(x, do)
    check_all(out, ref, dtype)
    check_empty_rows(out[0], out[1], ref[1])


@family_param
def test_blocks_of_128_keys(family, device):
    """BS=128 (the (128, 8) preset): FSA walks such a block in several key tiles in its backward."""
    x = Case("bs128", (260, 31), 1, 2, 32, 2, 128, "holes", seed=11).make(torch.float32, device)
    do = torch.randn_like(x.q)
    check_all(run_selected(family, x, do, check_indices=True), reference(x, do), torch.float32)


@family_param
def test_lse_gradient(family, device):
    """Gradients flow through the returned lse as well (d lse / d s = p)."""
    x = CASES[3].make(torch.float32, device)
    do = torch.randn_like(x.q)
    dlse = torch.randn(x.q.shape[1], x.q.shape[0], device=device)
    check_all(run_selected(family, x, do, dlse), reference(x, do, dlse), torch.float32)


@family_param
def test_noncontiguous_inputs(family, device):
    x = CASES[2].make(torch.float32, device)
    q = x.q.transpose(0, 1).contiguous().transpose(0, 1)  # [N, HQ, D] with head-major storage
    k = torch.cat([x.k, x.k], -1)[..., : x.k.shape[-1]]  # strided rows
    v = torch.stack([x.v, -x.v], -1)[..., 0]  # last-dim stride 2
    idx = torch.stack([x.block_indices, x.block_indices], -1)[..., 1]
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous() or idx.is_contiguous())
    xn = x._replace(q=q, k=k, v=v, block_indices=idx)
    do = torch.randn_like(x.q).transpose(0, 1).contiguous().transpose(0, 1)
    check_all(run_selected(family, xn, do), reference(x, do), torch.float32)


@family_param
def test_argument_errors(family, device):
    x = CASES[0].make(torch.float32, device)
    with pytest.raises(ValueError, match="`q`"):
        family(x.q.double(), x.k.double(), x.v.double(), x.block_indices, 16)
    with pytest.raises(ValueError, match="`block_size`"):
        family(x.q, x.k, x.v, x.block_indices, 256)
    with pytest.raises(ValueError, match="`block_indices`"):
        family(x.q, x.k, x.v, x.block_indices.long(), 16)
    bad = x.block_indices.clone()
    bad[5, 0, 0] = 99
    with pytest.raises(ValueError, match="`block_indices`"):
        family(x.q, x.k, x.v, bad, 16, check_indices=True)


@pytest.mark.parametrize("nsa_indices", [False, True], ids=["random", "nsa"])
def test_realistic_case_builder_makes_valid_inputs(nsa_indices):
    """The GPU tests' input builder (run here on the CPU, small): shapes, dtype, device and indices
    that satisfy the contract, for both index sources."""
    from nsa_baseline.contract import check_block_indices
    from tests.ops.cases import realistic_case

    x = realistic_case(300, 2, 3, 32, 4, 32, seqlens=[100, 7, 193], nsa_indices=nsa_indices, device="cpu",
                       dtype=torch.float32)
    assert x.q.shape == (300, 6, 32) and x.k.shape == x.v.shape == (300, 2, 32) and x.q.dtype == torch.float32
    assert x.block_indices.shape == (300, 2, 4) and x.block_indices.dtype == torch.int32
    assert x.cu_seqlens.tolist() == [0, 100, 107, 300] and x.block_size == 32
    check_block_indices(x.block_indices, 32, x.cu_seqlens)
    assert (x.block_indices >= 0).any()


@pytest.mark.gpu
@family_param
def test_gpu_cuda_graph_capture_replays_the_eager_result(family):
    """No host synchronisation on the call path (index checks off): forward and backward capture in a
    CUDA graph, and replaying it gives the eager result bit for bit. Under CUDA graphs the host's
    launch cost, which dominates FSA below ~16K tokens, is paid once at capture."""
    from tests.ops.cases import realistic_case

    x = realistic_case(8192, 2, 2, 128, 16, 64)

    def call(q, k, v):
        return family(q, k, v, x.block_indices, x.block_size, cu_seqlens=x.cu_seqlens, check_indices=False)

    q, k, v = (t.detach().clone().requires_grad_() for t in x[:3])
    graphed = torch.cuda.make_graphed_callables(call, (q, k, v))
    do = torch.randn_like(q)
    o = graphed(q, k, v)
    grads = torch.autograd.grad(o, (q, k, v), do)
    o_eager = call(q, k, v)
    eager = torch.autograd.grad(o_eager, (q, k, v), do)
    assert torch.equal(o, o_eager), "forward replay differs from eager"
    for name, a, b in zip(("dq", "dk", "dv"), grads, eager):
        assert torch.equal(a, b), f"{name} replay differs from eager"


@pytest.mark.gpu
def test_gpu_auto_never_times_inside_a_cuda_graph_capture(monkeypatch):
    """A capture that reaches fsa.auto before any eager call of that configuration takes the rule
    (timing would launch and synchronise inside the capture) and replays that family's result."""
    from fsa import auto
    from tests.ops.cases import realistic_case

    x = realistic_case(8192, 2, 2, 128, 16, 64)

    def call(fn):
        return fn(x.q, x.k, x.v, x.block_indices, x.block_size, cu_seqlens=x.cu_seqlens, check_indices=False)

    with torch.no_grad():
        expected = {name: call(fn) for name, fn in FAMILIES.items()}  # also compiles both families' kernels
        monkeypatch.setattr(auto, "_choices", {})
        graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
            out = call(auto.selected_attention)
        graph.replay()
        torch.cuda.synchronize()
    assert auto._choices == {}, "auto timed (and cached) inside the capture"
    assert torch.equal(out, expected[auto.rule_choice(x.q.shape[1] // x.k.shape[1])])
