"""ops/compression_grad_kernel.add_linear_block_grad (interpreter, fp32 exact dots and fp16) against the
PyTorch path it would replace (a GEMM, then an add through a permuted view), and the module's fused
backward with it switched on against the same backward with it off."""
import pytest
import torch

from nsa_baseline.ops import compression_grad
from nsa_baseline.ops.compression_grad_kernel import add_linear_block_grad
from tests.helpers import assert_close, sm90_resources


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_adds_each_rows_share_into_dx(dtype):
    """H = 3, 37 blocks of stride 4 (a partial last program), D = 16, C = 2, and 5 rows after the
    blocks that must stay as they were."""
    torch.manual_seed(0)
    h, nb, stride, d, c = 3, 37, 4, 16, 2
    dz = torch.randn(h, nb, c * d).to(dtype)
    w_cat = torch.randn(stride * d, c * d).to(dtype)
    dx = torch.randn(nb * stride + 5, h, d).to(dtype)
    want = dx.double().clone()
    want[: nb * stride] += (dz.double() @ w_cat.double().t()).view(h, nb, stride, d).permute(1, 2, 0, 3).reshape(
        nb * stride, h, d)
    add_linear_block_grad(dx, dz, w_cat, stride)
    assert_close(dx, want, dtype, "dx")
    assert torch.equal(dx[nb * stride:], want[nb * stride:].to(dtype))


def test_module_backward_equal_with_the_kernel(monkeypatch):
    """NativeSparseAttention's fused backward (linear compression, one sequence: the block path on x's
    own grid) gives the same gradients with FUSED_BLOCK_GRAD on as off (the GEMM path's backward:
    IN_PLACE_LINEAR off)."""
    from nsa_baseline.module import NativeSparseAttention

    monkeypatch.setattr(compression_grad, "IN_PLACE_LINEAR", False)

    torch.manual_seed(0)
    m = NativeSparseAttention(32, 4, 2, 16, backend="fsa", kernel_size=8, kernel_stride=4, block_size=16, topk=3,
                              window_size=16)
    with torch.no_grad():
        for p in (m.k_cmp_weight, m.v_cmp_weight):
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(70, 32)

    def grads():
        m.zero_grad()
        xx = x.clone().requires_grad_()
        m(xx).square().sum().backward()
        return [xx.grad] + [p.grad.clone() for p in (m.k_cmp_weight, m.v_cmp_weight, m.q_proj.weight)]

    monkeypatch.setattr(compression_grad, "FUSED_BLOCK_GRAD", False)
    base = grads()
    monkeypatch.setattr(compression_grad, "FUSED_BLOCK_GRAD", True)
    calls = []
    real = compression_grad.add_linear_block_grad
    monkeypatch.setattr(compression_grad, "add_linear_block_grad", lambda *a: (calls.append(1), real(*a))[1])
    fused = grads()
    assert calls, "the kernel path did not run"
    for name, a, b in zip(("x", "k_cmp_weight", "v_cmp_weight", "q_proj"), fused, base):
        assert_close(a, b, torch.float32, name)


def test_kernel_compiles_for_sm90_without_spills():
    """The interpreter does not type the kernel: compile it for sm_90 (Triton's ahead-of-time path, no
    GPU, in a subprocess without TRITON_INTERPRET) at the module's shape (D = 128, C * D = 256, stride
    16, the 64-block tile with 8 warps) and read ptxas's registers and spills."""
    out = sm90_resources(
        "from nsa_baseline.ops.compression_grad_kernel import _add_block_grad_kernel as fn",
        "k = compile_sm90(fn, 'bf16', dict(H=64, D=128, CD=256, STRIDE=16, BLOCK_B=64, BLOCK_D=128, BLOCK_CD=256,"
        " PREC='tf32'), 8, 1, scalars={'NB': 'i32', 'M': 'i32', 'stride_wh': 'i32', 'stride_wm': 'i32'}, int_ptrs=set())",
        "print(resources(k))")
    assert "spill(stack)     0 B" in out, out
