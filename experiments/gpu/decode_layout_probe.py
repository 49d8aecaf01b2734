"""Does the summaries' memory layout limit the decode step's compressed pass? The split compressed
select (decode_split.py) over the cache's k_cmp, v_cmp as stored ([B, max_cmp, H, D]: one head's
summaries are 256-byte rows 2 KB apart) and over a head-major copy of the same values (each head's
summaries contiguous, viewed with the same shape), same split counts and launch settings.

    OUT=./out python -m experiments.gpu.decode_layout_probe [--points 8:65536,8:131072]

Per point, layout, split count and setting: the _split_summaries_kernel's own time (torch.profiler over
graph replays) and its GB/s of k_cmp + v_cmp, the whole select stage (graph replay, do_bench median),
and a check that both layouts give the same o_cmp and block choices. Writes $OUT/decode_layout.csv.
"""
from __future__ import annotations

import argparse

import torch

from experiments import decode_timing as timing
from experiments.decode_timing import fill_cache, graphed
from experiments.gpu.decode_bench import BF16, D, H, HQ, bench_module, parse_points
from experiments.gpu.decode_tune import kernel_us
from experiments.gpu.provenance import out_dir, print_table, require_cuda, run_meta, write_rows

SPLITS = (8, 16, 17, 32)
SETTINGS = (dict(select_stages=2, summaries_per_tile=128), dict(select_stages=3, summaries_per_tile=64))


def head_major(t: torch.Tensor) -> torch.Tensor:
    """The same values as t [B, N, H, D], stored [B, H, N, D] (viewed back as [B, N, H, D])."""
    return t.transpose(1, 2).contiguous().transpose(1, 2)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--points", default="8:65536,8:131072", help="B:L pairs")
    args = ap.parse_args()
    require_cuda()
    from nsa_baseline.ops.decode_select import decode_compressed_select
    from nsa_baseline.ops.decode_split import split_compressed_select
    from nsa_baseline.ops.decode_tiles import decode_launch, group_pad, head_pad
    from nsa_baseline.utils.triton_utils import LOG2E, next_pow2

    out, meta = out_dir(), run_meta()
    m = bench_module()
    r, c, scale = m.block_size // m.kernel_stride, m.kernel_size // m.kernel_stride, D ** -0.5
    rows = []
    for b, length in parse_points(args.points):
        cache = fill_cache(m, b, length)
        q = torch.randn(b, HQ, D, device="cuda", dtype=BF16)
        pos = cache.lengths.clone()
        ref_o, ref_idx = decode_compressed_select(q, cache.k_cmp, cache.v_cmp, pos, m.kernel_size, m.kernel_stride,
                                                  m.block_size, m.topk, m.init_blocks, m.local_blocks, scale)
        layouts = {"as_stored": (cache.k_cmp, cache.v_cmp), "head_major": (head_major(cache.k_cmp),
                                                                           head_major(cache.v_cmp))}
        nbytes = 2 * b * H * ((length - m.kernel_size) // m.kernel_stride + 1) * D * 2
        for setting in SETTINGS:
            bj = max(next_pow2(m.topk), setting["summaries_per_tile"] // r)
            for s in SPLITS:
                for name, (kc, vc) in layouts.items():
                    def run():
                        return split_compressed_select(
                            q, kc, vc, pos, splits=s, max_cmp=kc.shape[1], qk_scale=scale * LOG2E, g=HQ // H,
                            g_pad=group_pad(HQ // H), block_d=head_pad(D), bj=bj, r=r, c=c,
                            kernel_size=m.kernel_size, kernel_stride=m.kernel_stride, block_size=m.block_size,
                            topk=m.topk, init_blocks=m.init_blocks, local_blocks=m.local_blocks, ieee=False,
                            while_loop=False)

                    with decode_launch(**setting):
                        o, idx = run()
                        err = float((o - ref_o).norm() / ref_o.norm())
                        same = float((idx.sort(-1).values == ref_idx.sort(-1).values).all(-1).float().mean())
                        us = kernel_us(run).get("_split_summaries_kernel", float("nan"))
                        stage_ms = timing.bench(graphed(run))[1]
                    rows.append(dict(B=b, L=length, layout=name, splits=s,
                                     settings=" ".join(f"{k}={v}" for k, v in setting.items()),
                                     summaries_us=f"{us:.2f}", summaries_GBps=f"{nbytes / us * 1e-3:.0f}",
                                     stage_us=f"{stage_ms * 1e3:.2f}", rel_err=f"{err:.2e}", same_sets=f"{same:.4f}"))
        print(f"  B={b} L={length} done", flush=True)
        del cache, layouts
        torch.cuda.empty_cache()
    write_rows(out / "decode_layout.csv", rows, meta)
    print_table(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
