"""Which folder a sweep writes (experiments/folders.py): the folder follows the configuration, the
defaults and presets keep the committed names; and a rerun says what it skipped and measured."""
import subprocess
import sys
from pathlib import Path

import pandas as pd
from omegaconf import OmegaConf

from experiments import folders, progress, runner
from experiments.callbacks import SweepCallback
from experiments.schema import SweepConfig, sweep_schema, validate

REPO = Path(__file__).resolve().parents[2]


def settings(**changes) -> dict:
    node = sweep_schema()
    for key, value in changes.items():
        OmegaConf.update(node, key, value)
    return folders.settings_of(node)


def test_every_non_default_setting_names_the_folder_and_nothing_else_does():
    base = settings()
    assert folders.folder_name(base, base, predicted=True) == "sweep"
    assert folders.folder_name(settings(scope="module", q_heads=40, gqa=5), base, False) == \
        "sweep_q_heads-40_scope-module"
    assert folders.folder_name(settings(head_dim=7, dtype="float16", **{"selection.window_size": 1024}), base,
                               False) == "sweep_head_dim-7_dtype-float16_selection.window_size-1024"
    # grid axes (plot coordinates) and run options never name a folder
    run_only = settings(gqa=2, seqlen=1000, kernels=["nsa"], measure="predict", retry_failed=True, seed=3,
                        breakdown=False, results_dir="/tmp/x", **{"sparsity.block_size": 128, "timing.rep_ms": 5})
    assert folders.folder_name(run_only, base, True) == "sweep"
    # the hardware's peaks only shape predictions
    h200 = settings(**{"hardware.name": "H200", "hardware.peak_gbps": 4800.0})
    assert folders.folder_name(h200, base, predicted=True) == "sweep_hardware-H200"
    assert folders.folder_name(h200, base, predicted=False) == "sweep"
    # a preset's own values are its defaults: fig4 stays fig4
    fig4 = settings(name="fig4", q_heads=64, scope="module")
    assert folders.folder_name(fig4, fig4, False) == "fig4"
    assert folders.folder_name(settings(name="fig4", q_heads=64, scope="module", head_dim=64), fig4, False) == \
        "fig4_head_dim-64"


def run_sweep(*overrides: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "experiments.sweep", *overrides, "hydra/job_logging=disabled",
           "hydra/hydra_logging=disabled"]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=180)


def test_sweeps_of_different_settings_write_different_folders_and_presets_keep_their_names(tmp_path):
    common = (f"results_dir={tmp_path}", f"hydra.sweep.dir={tmp_path}/hydra", "seqlen=8192", "sparsity=bs64_t16",
              "kernels=[nsa,fsa]", "pass=[fwd]")
    for overrides in (("gqa=1,2",), ("scope=module", "q_heads=8", "gqa=2"), ("head_dim=64", "gqa=2"),
                      ("paper=fig4", "gqa=1"), ("name=sweep_random_indices", "indices=random", "gqa=2")):
        proc = run_sweep(*overrides, *common)
        assert proc.returncode == 0, proc.stderr[-3000:]
    made = sorted(p.name for p in tmp_path.iterdir() if p.name != "hydra")
    assert made == ["fig4_predicted", "sweep_head_dim-64_predicted", "sweep_predicted",
                    "sweep_q_heads-8_scope-module_predicted", "sweep_random_indices_predicted"]
    for name in made:
        df = pd.read_csv(tmp_path / name / "results.csv")
        df = df[df["scope"].isin(["selected", "module"])]  # module/<branch> rows feed breakdown.png
        assert df["head_dim"].nunique() == df["scope"].nunique() == df["kv_heads"].nunique() == 1, name


def test_a_rerun_says_how_many_points_it_skipped_and_how_many_it_measured(tmp_path, capsys):
    cfg = validate(SweepConfig(results_dir=str(tmp_path), gqa=2, seqlen=8192, kernels=["nsa", "fsa"],
                               passes=["fwd", "bwd"], measure="predict"))
    callback = SweepCallback()
    callback.folders = {(str(tmp_path), "sweep", True)}
    progress.take_counts()
    runner.run_job(cfg)
    callback.on_multirun_end(None)
    assert "sweep: 4 (kernel, pass) points predicted, 0 skipped (already recorded)" in capsys.readouterr().out
    cfg.passes = ["fwd", "bwd", "fwd+bwd"]
    runner.run_job(cfg)
    callback.on_multirun_end(None)
    out = capsys.readouterr().out
    assert "sweep: 2 (kernel, pass) points predicted, 4 skipped (already recorded)" in out
    assert "retry_failed=true" in out
    assert progress.counts_line(False, {"done": 3, "skipped": 0}) == "3 (kernel, pass) points measured, 0 skipped " \
        "(already recorded)"
