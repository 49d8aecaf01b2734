"""Small helpers of every sweep job (the runner's and the decode jobs') and of the one-call GPU scripts:
timestamps, the commit, failure messages, out-of-memory detection, freeing device memory after a
failure. No Hydra here: the GPU scripts run where it is not installed."""
from __future__ import annotations

import datetime
import functools
import gc
import os
import subprocess
from pathlib import Path

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


@functools.lru_cache(maxsize=1)
def git_commit() -> str:
    """NSA_GIT_COMMIT when set (a tree copied to a lent GPU box, whose .git may be stale or absent),
    else HEAD of the checkout, with " (dirty)" when tracked files outside results/ differ from it."""
    if os.environ.get("NSA_GIT_COMMIT"):
        return os.environ["NSA_GIT_COMMIT"]
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True,
                              cwd=here, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!results"],
                               capture_output=True, text=True, cwd=here, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (head + " (dirty)" if dirty else head) or "unknown"
