"""What every one-call GPU script records beside its numbers, and where it writes them."""
from __future__ import annotations

import os
from pathlib import Path

import torch
import triton

from experiments.runner import git_commit


def run_meta() -> dict:
    """GPU, torch, Triton and commit (NSA_GIT_COMMIT first: a lent box's .git may be stale)."""
    return dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                git_commit=git_commit())


def out_dir() -> Path:
    """$OUT (the device tool's folder that comes back), else ./out; created."""
    out = Path(os.environ.get("OUT", "out"))
    out.mkdir(parents=True, exist_ok=True)
    return out
