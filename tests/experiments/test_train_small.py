"""experiments.gpu.train_small: the data is the same for every backend, and the --tiny CPU smoke run
trains, evaluates, writes one CSV per backend with provenance and draws the plot."""
import csv
import math
import sys

import pytest
import torch

from experiments.gpu.train_small import corpus, lr_at, windows


def test_corpus_is_stdlib_bytes_and_windows_follow_the_seed():
    data = corpus(max_bytes=20_000)
    assert data.dtype == torch.uint8 and data.numel() >= 20_000
    text = bytes(data[:20_000].tolist()).decode("utf-8", errors="replace")
    assert "import" in text or "def " in text
    a = windows(data, 3, 65, torch.Generator().manual_seed(7))
    b = windows(data, 3, 65, torch.Generator().manual_seed(7))
    assert a.shape == (3, 65) and torch.equal(a, b) and not torch.equal(a, windows(data, 3, 65, torch.Generator()))


def test_lr_schedule_warms_up_then_decays_to_a_tenth():
    lrs = [lr_at(s, 1000, 1e-3) for s in range(1000)]
    assert lrs[0] == pytest.approx(2e-5) and lrs[49] == pytest.approx(1e-3)
    assert all(x >= y for x, y in zip(lrs[49:], lrs[50:])) and lrs[-1] == pytest.approx(1e-4, rel=1e-2)


def test_tiny_run_writes_csvs_and_plot(tmp_path, monkeypatch):
    pytest.importorskip("transformers", reason="the `models` extra (transformers) is not installed")
    from experiments.gpu import train_small

    monkeypatch.setenv("OUT", str(tmp_path))
    monkeypatch.setattr(sys, "argv", ["train_small", "--tiny", "--steps", "2", "--max-bytes", "50000"])
    assert train_small.main() == 0
    for backend in ("dense", "torch"):
        with open(tmp_path / f"train_small_{backend}.csv") as f:
            rows = list(csv.DictReader(f))
        assert [r["step"] for r in rows] == ["1", "2"]
        assert all(math.isfinite(float(r["train_loss"])) for r in rows)
        assert 0 < float(rows[-1]["eval_loss"]) < 10 and rows[0]["eval_loss"] == ""
        assert rows[0]["gpu"] == "none (CPU)" and rows[0]["git_commit"] and rows[0]["dtype"] == "float32"
    assert (tmp_path / "train_small.png").stat().st_size > 10_000
