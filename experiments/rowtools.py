"""Small helpers of every sweep job (the runner's and the decode jobs'): timestamps, failure messages,
out-of-memory detection, freeing device memory after a failure."""
from __future__ import annotations

import datetime
import gc

import torch

MESSAGE_CHARS = 300


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def describe(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().replace("\n", " ")
    return text[:MESSAGE_CHARS]


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
