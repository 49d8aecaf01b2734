"""One GPU per sweep job when a parallel launcher (Hydra's joblib) runs several jobs at once.

Mapping job number -> GPU (job.num % count) lets two jobs share a GPU: workers take the next job as
soon as they finish, so job k + count can start while job k still runs, and both timings are wrong.
Instead a job holds an exclusive file lock on one GPU for as long as it runs, trying its own
GPU (job.num % count) first, then any free one, and waiting while all are busy. Locks are released
by the OS when a process dies, so a crashed job never leaves a GPU taken.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
import time
from pathlib import Path
from typing import Iterator, Optional


def default_lock_dir() -> Path:
    return Path(tempfile.gettempdir()) / f"nsa-sweep-gpus-{os.getuid()}"


@contextlib.contextmanager
def exclusive_gpu(count: int, first: int = 0, lock_dir: Optional[Path] = None,
                  poll_s: float = 0.5, timeout_s: Optional[float] = None) -> Iterator[int]:
    """Yield the index of a GPU in [0, count) that no other holder has until the block exits."""
    if count < 1:
        raise ValueError(f"argument `count` must be >= 1 GPUs, got {count}")
    lock_dir = lock_dir or default_lock_dir()
    lock_dir.mkdir(parents=True, exist_ok=True)
    order = [(first + i) % count for i in range(count)]
    start = time.monotonic()
    while True:
        for gpu in order:
            f = open(lock_dir / f"gpu{gpu}.lock", "w")
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.close()
                continue
            try:
                yield gpu
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)
                f.close()
            return
        if timeout_s is not None and time.monotonic() - start > timeout_s:
            raise TimeoutError(f"no free GPU among {count} after {timeout_s} s (locks in {lock_dir})")
        time.sleep(poll_s)
