"""The decode kernels' launch settings (nsa_baseline.ops.decode_tiles.DecodeLaunch), measured.

    OUT=./out python -m experiments.gpu.decode_tune [--points 1:65536,8:65536,32:65536,8:131072]

Llama3-8B heads (32 q / 8 kv, d = 128), (64, 16), bf16, a cache of random keys (decode_bench's).
Per (B, L) point and per stage, every setting of that stage's grid is timed on its own (do_bench
median of a CUDA-graph replay) and checked against the default setting's output: the compressed select (o_cmp relative error
and the share of (slot, KV head) whose chosen set is unchanged: a different split order may flip a
near tie), the selected + window attend (relative error of the gated output), the append (the summary
it writes). Then the whole attention step (graph replay) with the defaults and with the setting that
is best over all points (lowest geometric mean per stage), beside dense SDPA decode (best backend,
graph replay). Those steps complete a summary (the worst case, 1 step in kernel_stride); the tuned
step is also timed one position earlier (no summary) and the mean over 16 consecutive steps given. Writes decode_tune.csv and decode_tune_step.csv (GPU/torch/Triton/commit on every
row) under $OUT; stops starting new stages near --budget-s and keeps what it has.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import math
import time

import torch

from experiments import decode_timing as timing
from experiments.decode_timing import attention_step, fill_cache, graphed
from experiments.gpu.decode_bench import BF16, D, H, HQ, PRESET, bench_module, parse_points
from experiments.gpu.provenance import out_dir, print_table, require_cuda, run_meta, write_rows

GRIDS = {
    "select": dict(select_programs_per_sm=[2, 4, 8, 16], select_programs_per_sm_full=[2, 8],
                   select_warps=[4, 8], select_stages=[2, 3],
                   summaries_per_tile=[64, 128]),
    "attend": dict(attend_programs_per_sm=[2, 4, 8, 16], attend_warps=[4, 8], attend_stages=[2, 3],
                   attend_shares=[0, 1]),
    "append": dict(append_programs_per_sm=[1, 2, 4, 8]),
}
# --split-scan: the split count forced (splits=) against the launch settings, per stage
SPLIT_SCAN = {
    "select": ([8, 16, 32], dict(select_warps=[4, 8], select_stages=[2, 3, 4], summaries_per_tile=[64, 128])),
    "attend": ([1, 2, 4, 5, 8], dict(window_tile=[64, 128], attend_stages=[2, 3])),
}
# --ablation: the compressed pass's own kernel time (profiler) and GB/s over the select settings
ABLATION = dict(select_programs_per_sm=[4, 8, 16], select_stages=[2, 3], summaries_per_tile=[64, 128])
START = time.time()
DEV, DTYPE = "cuda", BF16  # a CPU smoke test (the interpreter) swaps these


def settings(grid: dict) -> list[dict]:
    names = list(grid)
    return [dict(zip(names, values)) for values in itertools.product(*grid.values())]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def same_sets(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.sort(-1).values == b.sort(-1).values).all(-1).float().mean())


class Point:
    """One (B, L): the cache, the new tokens and the three stages as closures."""

    def __init__(self, module, b: int, length: int):
        from nsa_baseline.ops.decode_append import decode_append
        from nsa_baseline.ops.decode_attend import decode_selected_window
        from nsa_baseline.ops.decode_select import decode_compressed_select

        self.module, self.b, self.length = module, b, length
        self.cache = c = fill_cache(module, b, length)
        self.q = torch.randn(b, HQ, D, device=DEV, dtype=DTYPE)
        self.k, self.v = (torch.randn(b, H, D, device=DEV, dtype=DTYPE) for _ in range(2))
        self.gates = torch.rand(b, HQ, 3, device=DEV, dtype=DTYPE)
        self.pos = c.lengths.clone()
        m, scale = module, D ** -0.5
        w = dict(k_weight=m.k_cmp_weight, k_pos=m.k_cmp_pos, v_weight=m.v_cmp_weight,
                 v_pos=m.v_cmp_pos) if m.compression == "linear" else {}
        self.select = lambda: decode_compressed_select(self.q, c.k_cmp, c.v_cmp, self.pos, m.kernel_size,
                                                       m.kernel_stride, m.block_size, m.topk, m.init_blocks,
                                                       m.local_blocks, scale)
        self.o_cmp, self.idx = self.select()
        self.attend = lambda: decode_selected_window(self.q, c.k, c.v, self.pos, self.idx, self.o_cmp, self.gates,
                                                     m.block_size, m.window_size, scale)
        self.append = lambda: decode_append(self.k, self.v, c.k, c.v, c.k_cmp, c.v_cmp, c.lengths, m.kernel_size,
                                            m.kernel_stride, advance=False, **w)
        self.row = (length - m.kernel_size) // m.kernel_stride  # the summary the new token completes

    def check(self, stage: str) -> dict:
        """Output of `stage` under the current settings (compared with the default's by the caller)."""
        if stage == "select":
            o, idx = self.select()
            return dict(o=o, idx=idx)
        if stage == "attend":
            return dict(o=self.attend())
        self.append()
        return dict(o=self.cache.k_cmp[:, self.row].clone())


def tune_stage(point: Point, stage: str, rows: list[dict]) -> None:
    from nsa_baseline.ops.decode_tiles import decode_launch

    ref = point.check(stage)
    fn = getattr(point, stage)
    for s in settings(GRIDS[stage]):
        with decode_launch(**s):
            got = point.check(stage)
            ms = timing.bench(graphed(fn))[1]  # replayed: eager timing of a few-us kernel times the host
        row = dict(B=point.b, L=point.length, stage=stage, settings=" ".join(f"{k}={v}" for k, v in s.items()),
                   ms=f"{ms:.5f}", rel_err=f"{rel(got['o'], ref['o']):.2e}")
        if stage == "select":
            row["same_sets"] = f"{same_sets(got['idx'], ref['idx']):.4f}"
        rows.append(row)


def kernel_us(fn, replays: int = 20) -> dict[str, float]:
    """Device time per call of each CUDA kernel fn launches (torch.profiler over graph replays)."""
    from torch.profiler import ProfilerActivity, profile

    replay = graphed(fn)
    replay()
    torch.cuda.synchronize()
    total: dict[str, float] = {}
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            replay()
        torch.cuda.synchronize()
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            total[e.name[:40]] = total.get(e.name[:40], 0.) + e.device_time / replays
    return total


def ablation(module, pts, rows: list[dict]) -> None:
    from nsa_baseline.ops.decode_tiles import decode_launch

    for b, length in pts:
        point = Point(module, b, length)
        summaries = 2 * b * H * (length // PRESET["kernel_stride"]) * D * 2  # k_cmp + v_cmp bytes read
        for s in settings(ABLATION):
            with decode_launch(**s):
                us = kernel_us(point.select)
            k_us = us.get("_split_summaries_kernel", float("nan"))
            rows.append(dict(B=b, L=length, settings=" ".join(f"{k}={v}" for k, v in s.items()),
                             summaries_us=f"{k_us:.2f}", summaries_GBps=f"{summaries / k_us * 1e-3:.0f}",
                             stage_us=f"{sum(us.values()):.2f}"))
        print(f"  ablation B={b} L={length} done ({time.time() - START:.0f} s)", flush=True)
        del point
        torch.cuda.empty_cache()


def split_scan(module, pts, rows: list[dict], budget_s: float, stages: list[str]) -> None:
    """Every forced split count x launch setting of the select and attend stages (graph replay, checked
    against the default rule's output), to see how the split rules should pick S."""
    from nsa_baseline.ops.decode_attend import decode_selected_window
    from nsa_baseline.ops.decode_select import decode_compressed_select
    from nsa_baseline.ops.decode_tiles import decode_launch

    m, scale = module, D ** -0.5
    for b, length in pts:
        point = Point(module, b, length)
        c = point.cache
        calls = {
            "select": lambda s: decode_compressed_select(point.q, c.k_cmp, c.v_cmp, point.pos, m.kernel_size,
                                                         m.kernel_stride, m.block_size, m.topk, m.init_blocks,
                                                         m.local_blocks, scale, splits=s),
            "attend": lambda s: decode_selected_window(point.q, c.k, c.v, point.pos, point.idx, point.o_cmp,
                                                       point.gates, m.block_size, m.window_size, scale, splits=s),
        }
        for stage, (splits, grid) in SPLIT_SCAN.items():
            if stage not in stages:
                continue
            ref = point.check(stage)
            for s, setting in itertools.product(splits, settings(grid)):
                if time.time() - START > budget_s:
                    break
                with decode_launch(**setting):
                    got = calls[stage](s)
                    got = dict(o=got[0], idx=got[1]) if stage == "select" else dict(o=got)
                    ms = timing.bench(graphed(lambda: calls[stage](s)))[1]
                    us = kernel_us(lambda: calls[stage](s))
                row = dict(B=b, L=length, stage=stage, splits=s,
                           settings=" ".join(f"{k}={v}" for k, v in setting.items()), ms=f"{ms:.5f}",
                           rel_err=f"{rel(got['o'], ref['o']):.2e}")
                if stage == "select":
                    row["same_sets"] = f"{same_sets(got['idx'], ref['idx']):.4f}"
                row["kernels_us"] = " ".join(f"{k.strip('_').split('_kernel')[0]}={v:.1f}" for k, v in us.items())
                rows.append(row)
        print(f"  split scan B={b} L={length} done ({time.time() - START:.0f} s)", flush=True)
        del point
        torch.cuda.empty_cache()


def best_settings(rows: list[dict], stage: str) -> dict:
    """The stage's setting with the lowest geometric mean time over the points (any failed check
    excludes a setting)."""
    by = {}
    for r in rows:
        if r["stage"] == stage:
            by.setdefault(r["settings"], []).append(r)
    ok = {k: v for k, v in by.items()
          if all(float(r["rel_err"]) < 2e-2 and float(r.get("same_sets", 1)) > 0.98 for r in v)}
    key = min(ok, key=lambda k: sum(math.log(float(r["ms"])) for r in ok[k]))
    return {kv.split("=")[0]: int(kv.split("=")[1]) for kv in key.split()}


def step_ms(point: Point) -> float:
    step, out = attention_step(point.module, point.cache)
    assert torch.isfinite(out).all()
    return timing.bench(graphed(step))[1]


def dense_ms(point: Point) -> float:
    c = point.cache
    kd, vd = c.k.transpose(1, 2).contiguous(), c.v.transpose(1, 2).contiguous()
    qd = point.q.view(point.b, HQ, 1, D)
    best = min(t[1] for _, mode, t, _ in timing.time_sdpa_backends(qd, kd, vd, modes=("graph",)) if t)
    del kd, vd
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--points", default="1:65536,8:65536,32:65536,8:131072", help="B:L pairs")
    ap.add_argument("--budget-s", type=float, default=420.0)
    ap.add_argument("--ablation", action="store_true", help="only the compressed pass's kernel, by profiler")
    ap.add_argument("--split-scan", action="store_true", help="split counts forced x launch settings, per stage")
    ap.add_argument("--stages", default=",".join(GRIDS), help="the stages to tune (select, attend, append)")
    args = ap.parse_args()
    require_cuda()
    from nsa_baseline.ops.decode_tiles import DECODE_LAUNCH, decode_launch

    out, meta = out_dir(), run_meta()
    print(f"decode_tune on {meta['gpu']}, commit {meta['git_commit']}; defaults {DECODE_LAUNCH}", flush=True)
    module = bench_module()
    pts = parse_points(args.points)
    rows = []
    if args.split_scan:
        split_scan(module, pts, rows, args.budget_s, args.stages.split(","))
        write_rows(out / "decode_split_scan.csv", rows, meta)
        for b, length in pts:
            for stage in set(SPLIT_SCAN) & set(args.stages.split(",")):
                print_table(sorted((r for r in rows if (r["B"], r["L"], r["stage"]) == (b, length, stage)),
                                   key=lambda r: float(r["ms"]))[:6])
        return 0
    if args.ablation:
        ablation(module, pts, rows)
        write_rows(out / "decode_ablation.csv", rows, meta)
        print_table(sorted(rows, key=lambda r: (r["B"], r["L"], float(r["summaries_us"]))))
        return 0
    for stage in args.stages.split(","):
        for b, length in pts:
            if time.time() - START > args.budget_s:
                print(f"budget reached: {stage} B={b} L={length} not tuned", flush=True)
                continue
            point = Point(module, b, length)
            tune_stage(point, stage, rows)
            print(f"  {stage} B={b} L={length} done ({time.time() - START:.0f} s)", flush=True)
            del point
            torch.cuda.empty_cache()
        write_rows(out / "decode_tune.csv", rows, meta)
    best = {}
    for stage in GRIDS:
        if any(r["stage"] == stage for r in rows):
            best.update(best_settings(rows, stage))
    print(f"best over the points: {best}", flush=True)
    defaults = dataclasses.asdict(DECODE_LAUNCH)
    steps = []
    for b, length in pts:
        point = Point(module, b, length)
        base = step_ms(point)
        with decode_launch(**best):
            tuned = step_ms(point)
            point.cache.set_lengths([length - 2] * b)  # a step that completes no summary (15 in 16 do not)
            plain = step_ms(point)
        dense = dense_ms(point)
        mean16 = (15 * plain + tuned) / 16
        steps.append(dict(B=b, L=length, default_ms=f"{base:.4f}", tuned_ms=f"{tuned:.4f}", dense_ms=f"{dense:.4f}",
                          dense_over_default=f"{dense / base:.2f}", dense_over_tuned=f"{dense / tuned:.2f}",
                          tuned_no_summary_ms=f"{plain:.4f}", tuned_mean16_ms=f"{mean16:.4f}",
                          dense_over_mean16=f"{dense / mean16:.2f}",
                          tuned=" ".join(f"{k}={v}" for k, v in best.items() if defaults[k] != v)))
        del point
        torch.cuda.empty_cache()
    write_rows(out / "decode_tune_step.csv", steps, meta)
    print_table(steps)
    for stage in GRIDS:  # the five fastest settings of each stage per point
        for b, length in pts:
            top = sorted((r for r in rows if r["stage"] == stage and r["B"] == b and r["L"] == length),
                         key=lambda r: float(r["ms"]))[:5]
            print_table(top)
    print(f"done in {time.time() - START:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
