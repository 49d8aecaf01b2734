"""Drive a module with a cache through a schedule of calls and check every call's outputs against
the module's forward over the whole sequences (one forward per check: the module is causal, so row t
of the whole sequence is the output at position t whatever follows)."""
from __future__ import annotations

import torch

from tests.helpers import assert_close


def packed(lengths) -> torch.Tensor:
    """int32 cu_seqlens of the given lengths."""
    return torch.tensor([0, *torch.tensor(lengths, dtype=torch.long).cumsum(0).tolist()], dtype=torch.int32)


def run_schedule(module, seqs: list[torch.Tensor], schedule: list[list[int]], max_seqlen: int, tol=None,
                 cache=None):
    """Feed `seqs` ([L_b, hidden] each, one per slot) to `module` with a cache, call i appending
    schedule[i][b] tokens of slot b; every call's outputs must equal the full forward's rows.
    Returns the cache (for further calls)."""
    dtype = seqs[0].dtype
    lens = [s.shape[0] for s in seqs]
    with torch.no_grad():
        full = module(torch.cat(seqs), packed(lens))
    starts = packed(lens).tolist()
    cache = module.new_cache(len(seqs), max_seqlen) if cache is None else cache
    done = [0] * len(seqs)
    for step, counts in enumerate(schedule):
        x = torch.cat([s[a:a + c] for s, a, c in zip(seqs, done, counts)])
        cu = None if len(seqs) == 1 and step % 2 else packed(counts)  # both forms for one slot
        y = module(x, cu, cache=cache)
        want = torch.cat([full[starts[b] + a:starts[b] + a + c] for b, (a, c) in enumerate(zip(done, counts))])
        assert_close(y, want, dtype, f"call {step} counts {counts} after {done}", tol=tol)
        done = [a + c for a, c in zip(done, counts)]
        assert cache.host_lengths == tuple(done) and cache.lengths.tolist() == done
    return cache
