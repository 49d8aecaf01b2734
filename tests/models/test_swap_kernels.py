"""use_nsa_attention with the kernel backends ("nsa", "fsa": Triton, through the interpreter on CPU,
fp32): logits and gradients of the swapped model against the hand-built float64 reference, on a
packed row (with an empty and a one-token sequence for FSA), g = 2 and g = 3."""
import copy

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import assert_close
from tests.models.grads import assert_grads_close
from tests.models.tiny_models import KERNEL, VOCAB, cu, reference_logits, tiny_model

from nsa_baseline.backends import resolve_backend  # noqa: E402
from nsa_baseline.models import use_nsa_attention  # noqa: E402

TOL = 2e-4  # fp32 (tests/helpers.py)


# Two of the four (family, backend) pairs: the interpreter takes 10-25 s per case. Sequences of more
# than topk * block_size = 48 tokens leave the top-T rule a real choice (one slot beyond the forced two).
@pytest.mark.parametrize("backend,family,lengths", [("fsa", "llama", (58, 0, 1, 7)), ("nsa", "qwen3", (50,))],
                         ids=["fsa-llama-g2-empty", "nsa-qwen3-g3"])
def test_kernel_backend_matches_hand_built_reference(backend, family, lengths):
    try:
        resolve_backend(backend)
    except ImportError as err:
        pytest.skip(str(err))
    model = use_nsa_attention(tiny_model(family), backend=backend, **KERNEL).train()
    assert all(layer.self_attn.nsa.branches().fallbacks == () for layer in model.model.layers)
    ref_model = copy.deepcopy(model).double()
    cs = cu(*lengths)
    n = int(cs[-1])
    ids, labels = torch.randint(0, VOCAB, (1, n)), torch.randint(0, VOCAB, (n,))
    logits = model(ids, cu_seq_lens_q=cs).logits
    ref = reference_logits(ref_model, ids, cs, KERNEL)
    assert_close(logits, ref, torch.float32, "logits", tol=TOL)
    F.cross_entropy(logits[0], labels).backward()
    F.cross_entropy(ref[0], labels).backward()
    assert_grads_close(model, ref_model, TOL)
