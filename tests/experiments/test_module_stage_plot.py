"""experiments.module_stage_plot on a committed H100 profile and on a made-up table: every kernel lands
in one stage, the stage times add up to the profile's, the dense time and commit come from the stages
CSV (a hex commit like 4e95142 stays a string), and the figure is written."""
from pathlib import Path

import pandas as pd
import pytest

from experiments import module_stage_plot as msp

RESULTS = Path(__file__).resolve().parents[2] / "results" / "module_profile"
HEADER = ("Name  Self CPU %  Self CPU  CPU total %  CPU total  CPU time avg  Self CUDA  Self CUDA %  CUDA total  "
          "CUDA time avg  # of Calls")


def _row(name: str, cuda: str, calls: int) -> str:
    return f"{name}  0.00%  0.000us  0.00%  0.000us  0.000us  {cuda}  1.00%  {cuda}  {cuda}  {calls}"


def test_stages_of_a_made_up_profile(tmp_path):
    text = "\n".join([HEADER, _row("fsa_selected_bwd_kernel", "2.000ms", 4), _row("window_fwd_kernel", "500.000us", 1),
                      _row("fsa_selected_fwd_reduce_kernel", "1.500ms", 3), _row("mystery_kernel", "10.000us", 1),
                      _row("void at::native::elementwise_kernel<128, 4, direct_copy...", "250.000us", 12)])
    prof = tmp_path / "module_profile_4096_2.txt"
    prof.write_text(text)
    times = msp.stage_times(msp.read_profile(prof))
    assert times.to_dict() == pytest.approx({"FSA pairs backward": 2.0, "FSA reductions": 1.5, "sliding window": 0.5,
                                             "PyTorch glue (copies, fills)": 0.25, "other": 0.01})
    stages = tmp_path / "stages.csv"
    pd.DataFrame([dict(N=4096, g=2, stage="sdpa full fwd+bwd", ms=3.5, gpu="GPU X", git_commit="4e95142")]).to_csv(
        stages, index=False)
    msp.main([str(prof), "--stages", str(stages)])
    assert (tmp_path / "module_profile_4096_2.png").stat().st_size > 0
    assert msp.dense_from_stages(stages, 4096, 2) == (3.5, {"gpu": "GPU X", "git_commit": "4e95142"})


def test_committed_h100_profile_sums_to_its_cuda_total(tmp_path):
    prof = RESULTS / "h100_5862855_module_profile_16384_1.txt"
    times = msp.stage_times(msp.read_profile(prof))
    total = float(prof.read_text().split("Self CUDA time total:")[1].split("ms")[0])
    assert times.sum() == pytest.approx(total, rel=0.02)  # the table lists the top kernels only
    assert times.get("other", 0.0) < 0.01 * total  # every big kernel has a stage
    assert times.idxmax() == "FSA pairs backward"


def test_bad_names_and_tables_are_refused(tmp_path):
    with pytest.raises(SystemExit, match="module_profile_<N>_<g>"):
        msp.main([str(tmp_path / "profile.txt")])
    empty = tmp_path / "module_profile_8_1.txt"
    empty.write_text("nothing here\n")
    with pytest.raises(ValueError, match="no profiler rows"):
        msp.read_profile(empty)
