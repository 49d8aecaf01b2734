"""Every `python -m experiments.gpu.<script>` without CUDA says in one line that it needs a GPU and
exits with status 1 (no traceback), instead of torch's AssertionError deep inside."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = sorted(p.stem for p in (REPO / "experiments" / "gpu").glob("*.py")
                 if p.stem not in ("provenance", "__init__"))


@pytest.fixture(scope="module")
def runs() -> dict:
    """(status, stderr) of each script, run side by side with no visible GPU."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    procs = {s: subprocess.Popen([sys.executable, "-m", f"experiments.gpu.{s}"], cwd=REPO, env=env, text=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE) for s in SCRIPTS}
    return {s: (p.wait(timeout=300), p.communicate()[1]) for s, p in procs.items()}


def test_every_gpu_script_is_checked():
    assert {"nsa_check", "branches_check", "fsa_bench", "fsa_tune", "graph_replay"} <= set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_gpu_script_without_cuda_says_so_and_exits_1(runs, script):
    status, stderr = runs[script]
    assert "Traceback" not in stderr, stderr[-2000:]
    assert stderr.strip().splitlines()[-1] == (f"experiments.gpu.{script} needs a CUDA GPU "
                                               "(torch.cuda.is_available() is False); nothing was run")
    assert status == 1
