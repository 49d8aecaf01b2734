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
    assert {"nsa_check", "branches_check", "fsa_bench", "fsa_tune", "graph_replay", "window_bench",
            "compression_bench", "e2e_layers", "train_small"} <= set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_gpu_script_without_cuda_says_so_and_exits_1(runs, script):
    status, stderr = runs[script]
    assert "Traceback" not in stderr, stderr[-2000:]
    assert stderr.strip().splitlines()[-1] == (f"experiments.gpu.{script} needs a CUDA GPU "
                                               "(torch.cuda.is_available() is False); nothing was run")
    assert status == 1


def test_rows_are_written_with_provenance_and_printed_aligned(tmp_path, capsys):
    import csv

    from experiments.gpu.provenance import print_table, write_rows

    rows = [{"impl": "ours", "ms": 1.5}, {"impl": "flex", "ms": 12.25, "note": "compiled"}]
    write_rows(tmp_path / "t.csv", rows, {"gpu": "G", "git_commit": "abc"})
    with open(tmp_path / "t.csv") as f:
        back = list(csv.DictReader(f))
    assert list(back[0]) == ["impl", "ms", "note", "gpu", "git_commit"]
    assert [(r["impl"], r["ms"], r["note"], r["gpu"]) for r in back] == [("ours", "1.5", "", "G"),
                                                                     ("flex", "12.25", "compiled", "G")]
    write_rows(tmp_path / "none.csv", [], {"gpu": "G"})
    assert not (tmp_path / "none.csv").exists()
    print_table(rows)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and lines[0].split() == ["impl", "ms", "note"]
    assert lines[1].index("1.5") == lines[2].index("12.25") == lines[0].index("ms")  # aligned columns
    assert lines[2].split() == ["flex", "12.25", "compiled"]


def test_provenance_and_the_decode_benches_need_no_hydra():
    """The lent GPU machine has no Hydra: run_meta() (which every script calls before timing) and the
    decode / chunk benches must import without it."""
    code = ("import sys; sys.modules['hydra'] = None; import torch; "
            "torch.cuda.get_device_name = lambda *a: 'Fake GPU'; "
            "import experiments.gpu.decode_bench, experiments.gpu.chunk_bench; "
            "from experiments.gpu.provenance import run_meta; m = run_meta(); "
            "assert m['gpu'] == 'Fake GPU' and m['git_commit'] == 'abc1234', m; "
            "assert 'hydra' not in {k.split('.')[0] for k, v in sys.modules.items() if v is not None}")
    env = dict(os.environ, NSA_GIT_COMMIT="abc1234", CUDA_VISIBLE_DEVICES="")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, text=True, capture_output=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def _globals(code, ops: tuple[str, ...]) -> set[str]:
    import dis
    names = {i.argval for i in dis.get_instructions(code) if i.opname in ops}
    for const in code.co_consts:
        if hasattr(const, "co_code"):
            names |= _globals(const, ops)
    return names


@pytest.mark.parametrize("script", SCRIPTS)
def test_gpu_script_names_nothing_undefined(script):
    """The scripts run only on the GPU machine, so a name lost in a refactor (an import moved away)
    would show there first, at the cost of device time: every global a function loads is defined."""
    import builtins
    import importlib
    mod = importlib.import_module(f"experiments.gpu.{script}")
    src = (REPO / "experiments" / "gpu" / f"{script}.py").read_text()
    code = compile(src, script, "exec")
    stored = _globals(code, ("STORE_NAME", "STORE_GLOBAL"))  # also those set under `if __name__ == ...`
    missing = sorted(n for n in _globals(code, ("LOAD_GLOBAL", "LOAD_NAME"))
                     if n not in vars(mod) and n not in stored and not hasattr(builtins, n))
    assert not missing, f"experiments/gpu/{script}.py uses undefined names {missing}"
