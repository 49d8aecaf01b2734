"""The README's ```python blocks run (on CPU, through the Triton interpreter) as written, apart from
these substitutions, which are the only edits made to a block before it runs:
- `device="cuda"` -> `device="cpu"` and `torch.bfloat16` -> `torch.float32` (the interpreter's bf16
  tl.dot is broken);
- the token count of `N, H, G, D = <N>, ...` -> README_TEST_N (default 64; the NSA kernel takes
  about 0.7 s per token in the interpreter at H=4, D=128, T=16).
A block that is a call signature (it holds the keyword-only marker `*,`, so it is no Python
statement) is checked instead against the real signatures of every family's selected_attention.
"""
import inspect
import os
import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
SMALL_N = int(os.environ.get("README_TEST_N", "64"))


def _runnable(block: str) -> str:
    block = block.replace('device="cuda"', 'device="cpu"').replace("torch.bfloat16", "torch.float32")
    return re.sub(r"^(N, H, G, D = )\d+", rf"\g<1>{SMALL_N}", block, flags=re.M)


def _is_signature(block: str) -> bool:
    return "*," in block


def test_readme_has_python_blocks():
    assert len(BLOCKS) >= 2 and any(not _is_signature(b) for b in BLOCKS)


@pytest.mark.parametrize("index", [i for i, b in enumerate(BLOCKS) if _is_signature(b)])
def test_readme_signature_matches_every_family(index):
    import fsa
    import nsa_baseline

    call = re.sub(r"#.*", "", BLOCKS[index])
    name, params = re.search(r"(\w+)\((.*)\)", call, flags=re.S).groups()
    # the README's own text, as the parameter list of a lambda
    documented = inspect.signature(eval(f"lambda {' '.join(params.split())}: None"))  # noqa: S307
    want = [(p.name, p.kind, p.default) for p in documented.parameters.values()]
    for fn in (nsa_baseline.selected_attention, fsa.selected_attention, fsa.auto.selected_attention):
        assert fn.__name__ == name
        assert [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()] == want, fn.__module__


@pytest.mark.parametrize("index", [i for i, b in enumerate(BLOCKS) if not _is_signature(b)])
def test_readme_example_runs(index):
    scope: dict = {}
    exec(compile(_runnable(BLOCKS[index]), f"README.md python block {index}", "exec"), scope)  # noqa: S102
    if {"o", "o2", "o3"} <= scope.keys():  # the README says: the same answer to rounding
        torch.testing.assert_close(scope["o2"], scope["o"], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(scope["o3"], scope["o"], rtol=1e-4, atol=1e-4)
