"""The decode kernels compile for sm_90 (Triton's ahead-of-time path, no GPU) in the layouts the
interpreter cannot vouch for: a paged cache (PAGE) and a slot map (SLOTS, chunked prefill). The
interpreter runs the Python of constexpr branches; only the compiler types them. In a subprocess
without TRITON_INTERPRET (this process's kernels are the interpreter's)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import triton

PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
REPO = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(not PTXAS.exists(), reason="Triton's ptxas is not in this install")
def test_paged_and_slot_mapped_decode_kernels_compile_for_sm90():
    names = ["append PAGE=64", "attend PAGE=64 SLOTS=True", "split keys PAGE=64 SLOTS=True", "select SLOTS=True",
             "split summaries SLOTS=True"]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-m", "experiments.decode_aot_check", "--only", ",".join(names)], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert all(any(line.startswith(n + " ") and "regs" in line for line in run.stdout.splitlines()) for n in names), \
        run.stdout
