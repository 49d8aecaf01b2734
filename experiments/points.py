"""One measured point, the tidy CSV row it produces, and the key that makes reruns skip it."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from experiments.schema import SweepConfig

AXES = ("kernel", "pass", "scope", "gqa", "q_heads", "kv_heads", "head_dim", "seqlen", "batch",
        "block_size", "topk", "dtype", "indices")
MEASURES = ("median_ms", "p20_ms", "p80_ms", "tflops", "gbps", "peak_extra_mem_gb", "rel_err",
            "model_gflop", "model_gbyte", "ttft_ms", "per_token_ms")  # the last two: scope=generate only
PROVENANCE = ("status", "message", "gpu", "torch", "triton", "git_commit", "timestamp")
COLUMNS = AXES + MEASURES + PROVENANCE
KEY_COLUMNS = AXES + ("gpu",)  # the same point on another GPU (or predicted) is another row
STATUSES = ("ok", "oom", "error", "unsupported", "predicted")


@dataclass(frozen=True)
class Point:
    """The shape of one job: everything but the kernel and the pass."""

    scope: str
    gqa: int
    kv_heads: int
    head_dim: int
    seqlen: int
    batch: int
    block_size: int
    topk: int
    dtype: str
    indices: str

    @property
    def q_heads(self) -> int:
        return self.gqa * self.kv_heads

    @property
    def num_tokens(self) -> int:
        return self.seqlen * self.batch

    @classmethod
    def from_config(cls, cfg: SweepConfig) -> "Point":
        return cls(cfg.scope, cfg.gqa, cfg.kv_heads, cfg.head_dim, cfg.seqlen, cfg.batch,
                   cfg.sparsity.block_size, cfg.sparsity.topk, cfg.dtype, cfg.indices)

    def label(self) -> str:
        return (f"{self.scope} g={self.gqa} H={self.kv_heads} D={self.head_dim} N={self.seqlen}x{self.batch} "
                f"({self.block_size},{self.topk}) {self.dtype} idx={self.indices}")


def make_row(point: Point, kernel: str, pass_name: str, status: str, meta: dict, message: str = "",
             **measures) -> dict:
    assert status in STATUSES, status
    row = {"kernel": kernel, "pass": pass_name, **asdict(point), "q_heads": point.q_heads}
    row.update({m: measures.get(m, math.nan) for m in MEASURES})
    row.update(meta)
    row.update(status=status, message=message)
    return {c: row[c] for c in COLUMNS}


def row_key(row: dict, key_columns: tuple = KEY_COLUMNS) -> tuple:
    """Hashable identity of a row; numbers are normalised so CSV round trips compare equal."""
    return tuple(str(int(row[c])) if isinstance(row[c], float) and float(row[c]).is_integer() else str(row[c])
                 for c in key_columns)
