"""experiments.gpu.retrieval_probe: the examples put the needle at the requested depth and the query
with its answer at the end, the loss mask is exactly the answer's value bytes, the data follows the
seed, and the --tiny CPU run trains, evaluates per depth, writes the CSVs with provenance and the plot."""
import csv
import math

import pytest
import torch

from experiments.gpu.retrieval_probe import (FILLER, KEYS, MARK, SEP, VALUES, example, fill_lengths, needle_len,
                                             pack, parse, train_batch)


def _in(ids: torch.Tensor, alphabet: torch.Tensor) -> bool:
    return bool(torch.isin(ids, alphabet).all())


@pytest.mark.parametrize("length, depth", [(256, 0.05), (256, 0.5), (1000, 0.25), (64, 0.9), (40, 0.99)])
def test_needle_at_depth_and_query_at_the_end(length, depth):
    ids, start = example(length, depth, torch.Generator().manual_seed(1), key_len=4, value_len=3)
    n = needle_len(4, 3)
    assert ids.shape == (length,) and start == min(int(depth * length), length - 2 * n)
    needle = ids[start:start + n]
    assert needle[0] == MARK and needle[5] == SEP and _in(needle[1:5], KEYS) and _in(needle[6:], VALUES)
    assert torch.equal(ids[-n:], needle)  # the query: marker + key + '=', then the value to produce
    rest = torch.cat([ids[:start], ids[start + n:length - n]])
    assert _in(rest, FILLER)  # nothing else looks like a needle


def test_packed_loss_mask_is_exactly_the_value_bytes():
    lengths, value_len = [40, 100, 64], 4
    batch = pack(lengths, [0.1, 0.5, 0.9], torch.Generator().manual_seed(3), key_len=3, value_len=value_len)
    assert batch.cu_seqlens.tolist() == [0, 40, 140, 204] and batch.ids.shape == (204,)
    want = torch.zeros(204, dtype=torch.bool)
    for end in (40, 140, 204):
        want[end - value_len:end] = True
    assert torch.equal(batch.targets, want)
    assert _in(batch.ids[batch.targets], VALUES)
    assert all(batch.ids[end - value_len - 1] == SEP for end in (40, 140, 204))  # the query's '=' precedes them
    assert batch.needles.tolist() == [4, 50, 64 - 2 * needle_len(3, value_len)]


def test_examples_follow_the_seed():
    args = parse(["--tiny", "--seqlen", "512", "--min-len", "32", "--short-max", "96"])
    a, b = (train_batch(0, args, torch.Generator().manual_seed(7)) for _ in range(2))
    c = train_batch(0, args, torch.Generator().manual_seed(8))
    for field in ("ids", "cu_seqlens", "targets", "needles"):
        assert torch.equal(getattr(a, field), getattr(b, field))
    assert not torch.equal(a.ids, c.ids)
    assert a.ids.numel() == 2 * 512  # two rows: short examples, then long ones
    lens = a.cu_seqlens.diff()
    row = int((a.cu_seqlens == 512).nonzero())
    assert lens[:row].min() >= 32 and lens[:row].max() < 96 + 32 and lens[row:].min() >= 96


def test_lengths_fill_the_row_exactly():
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        lengths = fill_lengths(4096, 64, 1024, gen)
        assert sum(lengths) == 4096 and min(lengths) >= 64 and max(lengths) < 1024 + 64


def test_tiny_run_writes_csvs_and_plot(tmp_path):
    pytest.importorskip("transformers", reason="the `models` extra (transformers) is not installed")
    from experiments.gpu import retrieval_probe

    # one 256-byte row per step (a short-example row, then a long one); per depth one pack of each context
    argv = ["--tiny", "--steps", "2", "--batch", "1", "--depths", "0.05,0.5", "--eval-examples", "1",
            "--out", str(tmp_path)]
    assert retrieval_probe.main(argv) == 0
    for backend in ("dense", "torch"):
        with open(tmp_path / f"retrieval_{backend}.csv") as f:
            rows = list(csv.DictReader(f))
        assert {"backend", "phase", "step", "context", "depth", "examples", "loss", "acc", "token_acc", "train_s",
                "seconds", "gpu", "torch", "triton", "git_commit", "seed", "dtype", "seqlen"} <= rows[0].keys()
        evals = [(c, d) for c in ("256", "64") for d in ("0.05", "0.5")]  # --seqlen, then --check-len
        assert [(r["phase"], r["step"], r["context"], r["depth"]) for r in rows] == [
            *[("eval", "0", c, d) for c, d in evals],
            ("train", "1", "mixed", "mixed"), ("train", "2", "mixed", "mixed"),
            *[("eval", "2", c, d) for c, d in evals]]
        assert [r["examples"] for r in rows if r["phase"] == "eval"][:4] == ["1", "1", "4", "4"]  # whole packs
        assert all(math.isfinite(float(r["loss"])) and 0 <= float(r["acc"]) <= 1 for r in rows)
        assert all(0 <= float(r["token_acc"]) <= 1 and r["seqlen"] == "256" for r in rows)
        assert float(rows[5]["train_s"]) > 0 and int(rows[5]["examples"]) > 0 and rows[0]["train_s"] == ""
        assert rows[0]["gpu"] == "none (CPU)" and rows[0]["git_commit"] and rows[0]["dtype"] == "float32"
    assert (tmp_path / "retrieval.png").stat().st_size > 10_000
