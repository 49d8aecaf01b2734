"""experiments/gpu/fsa_tune.py's per-point logic on the CPU (Triton interpreter, tiny sizes, a fake
timer): the default config first, every other config checked before it is timed, the budget honoured."""
import torch

from experiments.gpu import fsa_tune
from fsa import tuning
from nsa_baseline.utils.indices import random_causal_block_indices


def inputs(n=96, h=2, g=3, d=32, block=16, topk=3):
    q, k, v = torch.randn(n, h * g, d), torch.randn(n, h, d), torch.randn(n, h, d)
    return q, k, v, random_causal_block_indices(n, h, topk, block), block, topk, torch.randn(n, h * g, d)


def test_tune_point_checks_then_times_every_config_default_first():
    grid = [tuning.LaunchConfig(32, 1, 4, 2, block_n=8), tuning.LaunchConfig(16, 3, 4, 2, key_tile=32)]
    timed = []
    rows = fsa_tune.tune_point(*inputs(), grid, grid, timer=lambda fn: timed.append(fn) or 1.0,
                               seconds_left=lambda: 1.0)
    assert [r["pass"] for r in rows] == ["fwd"] * 3 + ["bwd"] * 3
    assert rows[0]["default"] and rows[3]["default"] and not any(r["default"] for r in rows[1:3] + rows[4:])
    assert all(r["status"] == "ok" and r["rel_err"] < 1e-5 for r in rows), rows
    assert len(timed) == 6 and (rows[1]["block_m"], rows[2]["chunk_tiles"]) == (32, 3)


def test_a_config_that_computes_something_else_is_not_timed(monkeypatch):
    real = fsa_tune.fsa_selected_fwd
    calls = []

    def wrong_after_reference(*args):  # the reference run is right, every later run is off
        o, lse = real(*args)
        calls.append(1)
        return (o * 1.5, lse) if len(calls) > 1 else (o, lse)

    monkeypatch.setattr(fsa_tune, "fsa_selected_fwd", wrong_after_reference)
    rows = fsa_tune.tune_point(*inputs(), [tuning.LaunchConfig(32, 1, 4, 2)], [], timer=lambda fn: 1.0,
                               seconds_left=lambda: 1.0)
    fwd = [r for r in rows if r["pass"] == "fwd"]
    assert [r["status"] for r in fwd] == ["mismatch", "mismatch"] and "ms" not in fwd[0]


def test_budget_spent_rows_are_recorded_not_run():
    rows = fsa_tune.tune_point(*inputs(), [tuning.LaunchConfig(32, 1, 4, 2)], [], timer=lambda fn: 1.0,
                               seconds_left=lambda: 0.0)
    assert {r["status"] for r in rows} == {"budget spent"}
