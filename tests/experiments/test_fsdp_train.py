"""experiments.gpu.fsdp_train: the data split, the loss check, and FSDP2 (fully_shard, bf16 mixed
precision) over 2 CPU processes (gloo) training like 1 process."""
import csv
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from experiments.gpu import fsdp_train

REPO = Path(__file__).resolve().parents[2]
RUN = ["--tiny", "--device", "cpu", "--steps", "3", "--lr", "0.02", "--max-bytes", "50000"]


def test_ranks_split_the_global_batch_evenly():
    assert [fsdp_train.rank_rows(8, 2, r) for r in (0, 1)] == [slice(0, 4), slice(4, 8)]
    with pytest.raises(ValueError, match="multiple of the world size 3"):
        fsdp_train.rank_rows(4, 3, 0)
    args = fsdp_train.parse(["--tiny", "--device", "cpu"])
    assert (args.backend, args.steps, args.size["batch"], args.rtol) == ("torch", 3, 4, 0.01)


def _write(path, losses):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["step", "loss"])
        w.writeheader()
        w.writerows({"step": i + 1, "loss": v} for i, v in enumerate(losses))
    return str(path)


def test_compare_accepts_bf16_noise_only(tmp_path):
    ref = _write(tmp_path / "a.csv", [5.0, 4.0])
    assert fsdp_train.compare(_write(tmp_path / "b.csv", [5.01, 3.97]), ref, 0.0, 0.01)[0]
    assert not fsdp_train.compare(_write(tmp_path / "c.csv", [5.0, 3.9]), ref, 0.0, 0.01)[0]
    assert not fsdp_train.compare(_write(tmp_path / "d.csv", [5.0]), ref, 0.0, 0.01)[0]


def test_two_processes_train_like_one(tmp_path, monkeypatch):
    pytest.importorskip("transformers", reason="the `models` extra (transformers) is not installed")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    two = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                            "-m", "experiments.gpu.fsdp_train", *RUN], cwd=REPO, text=True,
                           env=dict(os.environ, OUT=str(tmp_path / "w2")), stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT)
    monkeypatch.setenv("OUT", str(tmp_path / "w1"))  # one process, in this one, while the two run
    for key, value in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                           MASTER_PORT=str(port)).items():
        monkeypatch.setenv(key, value)
    assert fsdp_train.main(RUN) == 0
    assert two.wait(timeout=300) == 0, two.communicate()[0][-3000:]
    one, pair = tmp_path / "w1" / "fsdp_train_w1.csv", tmp_path / "w2" / "fsdp_train_w2.csv"
    with open(pair) as f:
        rows = list(csv.DictReader(f))
    assert [r["world_size"] for r in rows] == ["2"] * 3 and rows[0]["git_commit"] and rows[0]["gpu"] == "none (CPU)"
    ok, line = fsdp_train.compare(str(pair), str(one), 0.0, 2e-3)
    assert ok, line
    losses = [float(r["loss"]) for r in rows]
    assert losses[-1] < losses[0] - 0.05  # it trains: a wrong split or a missing gradient would show above
