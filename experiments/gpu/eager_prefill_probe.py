"""Why is the FSA prefill of `sweep=generate`'s eager pass 8x slower than in its graph pass (H100,
results/generate/h100_d298374_results.csv: 2870 vs 301 ms at 128K, g=4)? Prefills one 128K sequence
into an NSACache several times: fresh, after eager decode steps, after empty_cache and under a fixed
FSA buffer budget, printing each call's time, FSA pass split, free memory and Triton compiles.

    python -m experiments.gpu.eager_prefill_probe [--length 131072] [--steps 512] [--backend fsa]
"""
from __future__ import annotations

import argparse
import os

import torch
from triton import knobs

from experiments.gpu.provenance import require_cuda, run_meta
from fsa import forward as fsa_forward
from fsa import tuning
from nsa_baseline.inference.decode import decode_step
from nsa_baseline.module import NativeSparseAttention

compiles: list[tuple] = []  # (kernel name, Triton's cache key)
plans: list[tuple] = []  # (KV heads, query heads, passes) of each FSA forward


def _hook(*args, **kwargs):
    compiles.append((kwargs["fn"].name, kwargs["compile"]["key"]))  # the key holds every argument's specialization
    return None


def print_variants() -> None:
    """For each kernel compiled more than once: the key entries that differ between its variants."""
    by_name: dict[str, list] = {}
    for name, key in compiles:
        by_name.setdefault(name, []).append(key)
    for name, keys in by_name.items():
        if len(keys) < 2:
            continue
        flat = [list(k[1]) if isinstance(k, tuple) and len(k) > 1 and isinstance(k[1], (tuple, list)) else [k]
                for k in keys]
        diff = [i for i in range(min(map(len, flat))) if len({repr(f[i]) for f in flat}) > 1]
        print(f"{name}: {len(keys)} variants; differing entries", [(i, [f[i] for f in flat]) for i in diff], flush=True)
        if not diff:
            for k in keys:
                print("   key", repr(k)[:1500], flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--length", type=int, default=131072)
    ap.add_argument("--steps", type=int, default=512)
    ap.add_argument("--backend", default="fsa")
    args = ap.parse_args()
    require_cuda()
    print("eager_prefill_probe", run_meta(), vars(args), flush=True)
    knobs.runtime.jit_post_compile_hook = _hook
    real_plan = fsa_forward.launch_plan

    def plan(*a, **k):
        p = real_plan(*a, **k)
        plans.append((p.kv_heads_per_pass, p.heads_per_pass, len(list(p.passes()))))
        return p

    fsa_forward.launch_plan = plan
    dev, dt = torch.device("cuda"), torch.bfloat16
    torch.manual_seed(0)
    m = NativeSparseAttention(64 * 128, 64, 16, 128, block_size=64, topk=16, backend=args.backend).to(dev, dt)
    x = torch.randn(args.length, m.hidden_size, device=dev, dtype=dt)
    xs = torch.randn(1, m.hidden_size, device=dev, dtype=dt)
    cu = torch.tensor([0, args.length], device=dev, dtype=torch.int32)
    cache = m.new_cache(1, args.length + args.steps)

    def prefill(label: str) -> None:
        n_comp, n_plan = len(compiles), len(plans)
        free0 = torch.cuda.mem_get_info()[0]
        budget = tuning.buffer_budget_bytes(dev)  # what the call's split will see (FSA_BUFFER_BUDGET_GB first)
        ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
        torch.cuda.synchronize()
        ev[0].record()
        cache.set_lengths([0])
        m(x, cu, cache=cache)
        ev[1].record()
        torch.cuda.synchronize()
        print(f"{label:28s} {ev[0].elapsed_time(ev[1]):9.1f} ms  free {free0 / 2**30:6.1f} GiB  reserved "
              f"{torch.cuda.memory_reserved() / 2**30:6.1f} GiB  budget {budget / 2**30:5.1f}"
              f" GiB  plans {plans[n_plan:]}  compiles {len(compiles) - n_comp}", flush=True)
        for name, _ in compiles[n_comp:]:
            print("    compiled", name, flush=True)

    def steps() -> None:
        for _ in range(args.steps):
            decode_step(m, xs, cache)
        torch.cuda.synchronize()

    with torch.no_grad():
        for i in range(3):
            prefill(f"fresh {i}")
        steps()
        for i in range(3):
            prefill(f"after {args.steps} eager steps {i}")
        steps()
        torch.cuda.empty_cache()
        prefill("after steps + empty_cache")
        steps()
        os.environ[tuning.BUDGET_ENV] = "16"
        prefill("after steps, budget 16 GiB")
        del os.environ[tuning.BUDGET_ENV]
    with torch.enable_grad():  # the sweep's pass runs outside no_grad
        steps()
        prefill("after steps, grad enabled")
        prefill("grad enabled again")
    print_variants()


if __name__ == "__main__":
    main()
