"""The NSA module (FSA backend, fwd+bwd) captured in a CUDA graph replays what eager gives (issue
#14: the module step captures in a CUDA graph), with the compression switches off and on. GPU only:
CUDA graphs need a device."""
import pytest
import torch


@pytest.mark.gpu
@pytest.mark.parametrize("switches", ["default", "sdpa_in_place", "off"])
def test_gpu_module_replays_from_a_cuda_graph(monkeypatch, switches):
    """bf16, 8K tokens, 32 query / 8 KV heads, d = 128: torch.cuda.make_graphed_callables over the
    module (its eager warm-up builds the cached layouts, then it captures), output and the gradients
    of the input and of every parameter equal to eager bit for bit."""
    from nsa_baseline import fused_attention
    from nsa_baseline.module import NativeSparseAttention
    from nsa_baseline.ops import compression_grad

    if switches == "sdpa_in_place":
        monkeypatch.setattr(fused_attention, "COMPRESSED_SDPA_MIN_TOKENS", 0)
        monkeypatch.setattr(compression_grad, "IN_PLACE_LINEAR", True)
    elif switches == "off":
        monkeypatch.setattr(fused_attention, "COMPRESSED_SDPA_MIN_TOKENS", None)
        monkeypatch.setattr(compression_grad, "IN_PLACE_LINEAR", False)
    torch.manual_seed(0)
    m = NativeSparseAttention(1024, 32, 8, 128, backend="fsa").cuda().to(torch.bfloat16)
    with torch.no_grad():
        for p in (m.k_cmp_pos, m.v_cmp_pos):
            p.add_(0.02 * torch.randn_like(p))
    x = torch.randn(8192, 1024, device="cuda", dtype=torch.bfloat16).requires_grad_()
    dy = torch.randn(8192, 1024, device="cuda", dtype=torch.bfloat16)

    def grads(fn):
        m.zero_grad(set_to_none=True)
        x.grad = None
        y = fn(x)
        y.backward(dy)
        return [y.detach().clone(), x.grad.clone()] + [p.grad.clone() for p in m.parameters()]

    eager = grads(m)
    graphed = torch.cuda.make_graphed_callables(m, (x,))  # warms up eagerly, then captures
    replay = grads(graphed)
    names = ["y", "dx"] + [name for name, _ in m.named_parameters()]
    for name, a, b in zip(names, replay, eager):
        assert torch.equal(a, b), name
