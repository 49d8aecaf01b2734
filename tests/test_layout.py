"""The package layout: import directions, file sizes, the family registry, and the errors a new user
meets first (kernels on CPU without the interpreter, a block size the backend's kernels lack)."""
import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("nsa_baseline", "fsa")
MAX_LINES = 450


def _files(*parts):
    return sorted(ROOT.joinpath(*parts).rglob("*.py"))


def _imported_modules(path: Path) -> set[str]:
    """Every module an `import` / `from ... import` of the file names (at any depth: lazy imports too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def _hits(files, forbidden: str):
    return {str(f.relative_to(ROOT)): sorted(m for m in _imported_modules(f)
                                             if m == forbidden or m.startswith(forbidden + "."))
            for f in files if any(m == forbidden or m.startswith(forbidden + ".") for m in _imported_modules(f))}


def test_kernels_never_import_the_reference():
    assert _hits(_files("nsa_baseline", "ops") + _files("fsa"), "nsa_baseline.reference") == {}


def test_nsa_baseline_never_imports_experiments_or_fsa_at_top_level():
    assert _hits(_files("nsa_baseline"), "experiments") == {}
    for f in _files("nsa_baseline"):  # the registry names fsa in strings only, imported on use
        top = [n for n in ast.parse(f.read_text()).body if isinstance(n, (ast.Import, ast.ImportFrom))]
        mods = {a.name for n in top if isinstance(n, ast.Import) for a in n.names} | \
            {n.module for n in top if isinstance(n, ast.ImportFrom) and n.module}
        assert not any(m == "fsa" or m.startswith("fsa.") for m in mods), f


_PROBE = """
import importlib, pkgutil, sys
import fsa, nsa_baseline.ops
kernels = ["fsa", "nsa_baseline.ops"]
for pkg in kernels:
    for m in pkgutil.walk_packages(importlib.import_module(pkg).__path__, pkg + "."):
        importlib.import_module(m.name)
assert "nsa_baseline.reference" not in sys.modules, "a kernel module imported the reference"
for m in pkgutil.walk_packages(importlib.import_module("nsa_baseline").__path__, "nsa_baseline."):
    importlib.import_module(m.name)
assert not [m for m in sys.modules if m == "experiments" or m.startswith("experiments.")]
print("ok")
"""


def test_import_directions_in_a_fresh_process():
    """Importing every module of fsa and nsa_baseline.ops leaves the reference out of sys.modules;
    importing every module of nsa_baseline brings in no experiments module."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", _PROBE], cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


def test_no_package_file_over_the_line_limit():
    long = {str(f.relative_to(ROOT)): n for pkg in PACKAGES for f in _files(pkg)
            if (n := len(f.read_text().splitlines())) > MAX_LINES}
    assert long == {}


_CPU_CALLS = """
import torch, fsa, nsa_baseline
q, k, v = torch.randn(8, 2, 16), torch.randn(8, 1, 16), torch.randn(8, 1, 16)
idx = torch.zeros(8, 1, 1, dtype=torch.int32)
for fn in (nsa_baseline.selected_attention, fsa.selected_attention, fsa.auto.selected_attention):
    try:
        fn(q, k, v, idx, 16)
    except ValueError as err:
        print(err)
    else:
        print("no error")
"""


def test_kernels_on_cpu_without_the_interpreter_say_what_to_do():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", _CPU_CALLS], cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 3
    for line in lines:
        for part in ("argument `q`", "CUDA tensors", "TRITON_INTERPRET=1", "nsa_baseline.reference"):
            assert part in line, line


def test_family_registry_serves_backends_and_auto():
    import fsa
    import nsa_baseline
    from fsa import auto
    from nsa_baseline import backends, contract, families

    assert contract.BLOCK_SIZES == (16, 32, 64, 128)
    assert families.get_family("nsa").selected_attention is nsa_baseline.selected_attention
    assert families.get_family("fsa").selected_attention is fsa.selected_attention
    assert families.get_family("auto").selected_attention is auto.selected_attention
    assert set(families.candidates()) == {"nsa", "fsa"} and auto._family_fns == families.candidates()
    for name, fam in families.FAMILIES.items():
        assert fam.block_sizes == contract.BLOCK_SIZES
        assert backends.BACKENDS[name]["selected_attention"] == (fam.entry,)
    with pytest.raises(ValueError, match="family"):
        families.get_family("flash")


@pytest.mark.parametrize("backend", ["nsa", "fsa", "auto"])
def test_module_checks_the_backend_block_size_when_built(backend):
    from nsa_baseline.module import NativeSparseAttention

    with pytest.raises(ValueError, match="`block_size`.*48"):
        NativeSparseAttention(64, 4, 2, 16, block_size=48, backend=backend)
    NativeSparseAttention(64, 4, 2, 16, block_size=48, backend="torch")  # the reference takes any size
    NativeSparseAttention(64, 4, 2, 16, block_size=64, backend=backend)


def test_block_size_256_is_not_in_the_contract():
    from nsa_baseline.contract import check_selected_args

    q, k = torch.randn(8, 2, 16), torch.randn(8, 1, 16)
    with pytest.raises(ValueError, match="block_size"):
        check_selected_args(q, k, k, torch.zeros(8, 1, 1, dtype=torch.int32), 256)
