"""Automatic NSA / FSA choice per configuration.

On CUDA the first call with a new configuration times both families on the call's own inputs
(forward, plus backward when gradients are needed), caches the faster one, and every later call with
that configuration dispatches straight to it. The configuration key is (GPU, dtype, G, H, D, block
size, T, N rounded up to a power of two, batch, grad). Set FSA_AUTO_CACHE=path.json to keep choices
across processes. Without CUDA (interpreter) nothing can be timed; the rule below is used instead.
Under torch.compile or CUDA-graph capture nothing is timed either: a choice made by an earlier eager
call, else the rule.
"""
from __future__ import annotations

import json
import os
from typing import Callable, Optional

import torch
import triton

from nsa_baseline.contract import check_selected_args
from nsa_baseline.families import candidates

CACHE_ENV = "FSA_AUTO_CACHE"
_choices: dict[str, str] = {}
_gpu_names: dict[int, str] = {}
# The families timed against each other (nsa_baseline.families), imported now: torch.compile cannot
# trace an import inside selected_attention.
_family_fns: dict[str, Callable] = candidates()


def _gpu_name(device: torch.device) -> str:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _gpu_names:
        _gpu_names[index] = torch.cuda.get_device_name(index)
    return _gpu_names[index]


def rule_choice(group_size: int) -> str:
    """Without a GPU to measure on: FSA avoids NSA's padded group tile, which wastes most of NSA's
    work for small G; at G = 16 that tile has no padding left and NSA's query-outer loop wins
    (measured on the H100: results/sweep, README "Which kernel")."""
    return "fsa" if group_size <= 8 else "nsa"


def config_key(q, k, block_indices, block_size, batch: int, needs_grad: bool) -> str:
    n, hq, d = q.shape
    h, t_sel = k.shape[1], block_indices.shape[2]
    gpu = _gpu_name(q.device) if q.is_cuda else "cpu"
    return (f"{gpu}|{str(q.dtype).removeprefix('torch.')}|G{hq // h}|H{h}|D{d}|BS{block_size}|T{t_sel}"
            f"|N{triton.next_power_of_2(n)}|B{batch}|grad{int(needs_grad)}")


def _load_cache() -> None:
    path = os.environ.get(CACHE_ENV)
    if path and os.path.exists(path) and not _choices:
        with open(path) as f:
            _choices.update(json.load(f))


def _save_cache() -> None:
    path = os.environ.get(CACHE_ENV)
    if path:
        with open(path, "w") as f:
            json.dump(_choices, f, indent=1, sort_keys=True)


def measure(fn: Callable, q, k, v, block_indices, block_size, cu_seqlens, scale, needs_grad: bool) -> float:
    """Median ms of one forward (+ backward) of `fn` on detached copies of the call's inputs."""
    qq, kk, vv = (x.detach().requires_grad_(needs_grad) for x in (q, k, v))
    do = torch.randn_like(q) if needs_grad else None

    def step():
        o = fn(qq, kk, vv, block_indices, block_size, cu_seqlens=cu_seqlens, scale=scale)
        if needs_grad:
            torch.autograd.grad(o, (qq, kk, vv), do)

    with torch.enable_grad() if needs_grad else torch.no_grad():
        return triton.testing.do_bench(step, warmup=5, rep=30, return_mode="median")


def choose(q, k, v, block_indices, block_size, cu_seqlens, scale, batch: int) -> str:
    needs_grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
    if not q.is_cuda:
        return rule_choice(q.shape[1] // k.shape[1])
    if torch.compiler.is_compiling() or torch.cuda.is_current_stream_capturing():
        # no timing inside a traced graph or a CUDA-graph capture: an earlier eager choice, else the rule
        return _choices.get(config_key(q, k, block_indices, block_size, batch, needs_grad),
                            rule_choice(q.shape[1] // k.shape[1]))
    _load_cache()
    key = config_key(q, k, block_indices, block_size, batch, needs_grad)
    if key not in _choices:
        times = {name: measure(fn, q, k, v, block_indices, block_size, cu_seqlens, scale, needs_grad)
                 for name, fn in _family_fns.items()}
        _choices[key] = min(times, key=times.get)
        _save_cache()
    return _choices[key]


def selected_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_indices: torch.Tensor,
    block_size: int,
    *,
    cu_seqlens: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    return_lse: bool = False,
    check_indices: Optional[bool] = None,
):
    r"""Selected attention through whichever family is faster for this configuration.

    Same contract as nsa_baseline.selected_attention / fsa.selected_attention (see there).
    """
    a = check_selected_args(q, k, v, block_indices, block_size, cu_seqlens, scale)
    name = choose(q, k, v, block_indices, block_size, a.cu_seqlens, a.scale, a.batch)
    return _family_fns[name](q, k, v, block_indices, block_size, cu_seqlens=a.cu_seqlens, scale=a.scale,
                             return_lse=return_lse, check_indices=check_indices)


def chosen_family(q, k, block_indices, block_size, batch: int = 1, needs_grad: bool = True) -> Optional[str]:
    """The cached choice for a configuration, if one was made (for reports and tests)."""
    return _choices.get(config_key(q, k, block_indices, block_size, batch, needs_grad))
